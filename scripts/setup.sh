#!/usr/bin/env bash
# Install everything transcend needs on a fresh Debian 12 machine, as root:
# Debian packages (libnbd, QEMU, libvirt, nbdkit; PostgreSQL and Chromium for tests), a venv with
# the package and its C extension built, and libvirtd running. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(
  # build: the C extension and libvirt-python
  gcc pkg-config python3-dev libnbd-dev libzstd-dev libxxhash-dev libssl-dev libvirt-dev
  # data path and platforms
  libnbd-bin nbdkit nbdkit-plugin-python qemu-utils qemu-system-x86 qemu-block-extra
  libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu dnsmasq-base iproute2
  # packet loss between the test sites where the kernel has no netem (tests/harness/netns.py)
  nftables iputils-ping
  gnutls-bin
  # test guest: kernel extracted from its .deb, busybox init, boot loader, filesystems
  busybox-static e2fsprogs cpio zstd syslinux syslinux-common mtools fdisk dosfstools kmod
  # catalog tests against a real PostgreSQL; the SLA report test renders in headless Chromium
  postgresql chromium
  # vSphere tests: govmomi's vCenter simulator, built from Debian's Go sources (GOPATH mode)
  golang-go golang-github-vmware-govmomi-dev
  # guest preparation before a recovered VM's first boot: re-IP and virt-v2v conversion
  libguestfs-tools virt-v2v
  # the Debian test guest virt-v2v converts (tests/harness/debian_guest.py)
  debootstrap
)

missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import blockstream._blockstream, libvirt, temporalio" \
  || { echo "setup: the package did not build; see the pip output above" >&2; exit 1; }

# /dev/kvm as Debian's udev rule leaves it (root:kvm 0660). Containers without udev
# have it root-only; libvirt then finds on every domain definition that the KVM it
# probed is "not available now" and re-probes QEMU's capabilities, ~45 s each time.
if [ -c /dev/kvm ] && getent group kvm >/dev/null; then
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm || echo "setup: could not give /dev/kvm to group kvm" >&2
fi

# libvirtd without systemd (containers, CI): start the daemons ourselves.
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  pgrep -x virtlogd >/dev/null || virtlogd -d
  pgrep -x libvirtd >/dev/null || libvirtd -d
  for _ in $(seq 1 50); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.2
  done
  virsh -c qemu:///system version >/dev/null || { echo "setup: libvirtd did not start" >&2; exit 1; }
fi
# libguestfs (re-IP, conversion) boots an appliance with the host's kernel from /boot.
# A container or microVM host may have none: unpack Debian's cloud kernel for it.
# tests/conftest.py points SUPERMIN_KERNEL/_MODULES/_KERNEL_VERSION at it.
LGK=/var/cache/transcend-libguestfs-kernel
if ! ls /boot/vmlinuz-* >/dev/null 2>&1 && [ ! -s "$LGK/version" ]; then
  pkg=$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -1)
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -q "$pkg" >/dev/null)
  rm -rf "$LGK.new" && mkdir -p "$LGK.new"
  dpkg-deb -x "$tmp"/*.deb "$LGK.new"
  version=$(ls "$LGK.new/lib/modules")
  depmod -b "$LGK.new" "$version"
  echo "$version" > "$LGK.new/version"
  rm -rf "$LGK" "$tmp" && mv "$LGK.new" "$LGK"
fi
mkdir -p /lib/modules  # supermin lstat()s it even when SUPERMIN_MODULES points elsewhere
echo "setup: ready"
