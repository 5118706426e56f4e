"""A distribution-shaped test guest: Debian 12 (bookworm) that virt-v2v can convert.

The busybox test guest (tests/harness/guest.py) has no package database, no grub
and no /etc/os-release, so virt-v2v's inspection rejects it. This one is a small
but real Debian installation:

* MBR disk (2 GiB virtual), one ext4 partition from 1 MiB, label ``transcend-deb``
  and a fixed UUID (``/etc/fstab`` and grub find the root by it, so the disk's bus
  does not matter);
* ``debootstrap --variant=minbase`` plus systemd, the cloud kernel
  (``linux-image-cloud-amd64``: small, with virtio), ``initramfs-tools`` and
  ``grub-pc``; documentation, locales and the apt cache removed;
* grub installed to the disk's MBR with the console on ttyS0;
* a systemd unit printing, once booted, ``TRANSCEND-DEBIAN-UP <hostname>
  initrd=<sha256> pre-v2v=<sha256|none>`` on ttyS0: the health check, and what the
  guest booted with. virt-v2v rebuilds a Debian guest's initramfs (with the virtio
  drivers) and keeps the old one as ``/boot/initrd.img-<version>.pre-v2v``; the
  hashes are of those two files.

Built without mounting anything and without loop devices: debootstrap into a
directory, ``mkfs.ext4 -d`` writes that tree straight into the partition of a raw
file (``-E offset``), and grub is installed by the guest's own ``grub-install``
run inside a libguestfs appliance (guestfish), where the disk is ``/dev/sda``.

Cached under :data:`DEFAULT_CACHE_DIR` keyed by a hash of this module (the
recipe); a lock file serialises concurrent builders and the finished build
directory appears by an atomic rename. Cold build here: about 65 s (debootstrap
with the download ~45 s, grub in a TCG appliance ~15 s); the image is 2 GiB
virtual, ~290 MiB of qcow2.

    image = build_debian_guest()
    disk = make_debian_disk(image, tmp_path / "src.qcow2")   # private copy to boot
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests.harness import libguestfs
from tests.harness.locks import file_lock

DEFAULT_CACHE_DIR = Path(os.environ.get("TRANSCEND_DEBIAN_CACHE", "/var/cache/transcend-test-debian"))

#: Printed on ttyS0 by the guest once multi-user.target is reached.
UP_MARKER = "TRANSCEND-DEBIAN-UP"
HOSTNAME = "transcend-debian"

SUITE = "bookworm"
MIRROR = os.environ.get("TRANSCEND_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = ("systemd-sysv", "linux-image-cloud-amd64", "initramfs-tools", "grub-pc")

MIB = 1 << 20
DISK_SIZE = 2048 * MIB
PART_START = 1 * MIB
ROOT_LABEL = "transcend-deb"
ROOT_UUID = "7472616e-7363-656e-6400-0000000000de"
CMDLINE = "console=ttyS0,115200n8"

# Removed from the tree: not needed to boot or convert, and every byte of the image
# is copied by each test's first replication cycle.
PRUNE = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
         "usr/share/info", "usr/share/locale", "usr/share/i18n", "var/cache/debconf/templates.dat-old")

FILES: dict[str, str] = {
    "etc/hostname": f"{HOSTNAME}\n",
    "etc/hosts": f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n",
    "etc/fstab": f"UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\n",
    # No timeout, console on the serial port (grub's menu and the kernel's messages).
    "etc/default/grub": (
        "GRUB_DEFAULT=0\nGRUB_TIMEOUT=0\nGRUB_DISTRIBUTOR=Debian\n"
        f'GRUB_CMDLINE_LINUX_DEFAULT=""\nGRUB_CMDLINE_LINUX="{CMDLINE}"\n'
        'GRUB_TERMINAL=serial\nGRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"\n'
        "GRUB_DISABLE_OS_PROBER=true\n"
    ),
    # Future dpkg runs (virt-v2v's, if any) keep the image small too.
    "etc/dpkg/dpkg.cfg.d/01-transcend-nodoc": (
        "path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\n"
        "path-exclude /usr/share/locale/*\n"
    ),
    "etc/systemd/system/transcend-up.service": (
        "[Unit]\nDescription=transcend test guest: announce the boot on ttyS0\n"
        "After=local-fs.target\n\n"
        "[Service]\nType=oneshot\nRemainAfterExit=yes\n"
        "ExecStart=/usr/local/sbin/transcend-up\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    ),
    "usr/local/sbin/transcend-up": (
        "#!/bin/sh\n"
        "# The health-check line. The hashes tell which initramfs this boot used, and\n"
        "# what virt-v2v kept of the one it replaced (it renames it to *.pre-v2v).\n"
        'hash_of() { if [ -e "$1" ]; then sha256sum "$1" | cut -d" " -f1; else echo none; fi; }\n'
        'initrd=/boot/initrd.img-$(uname -r)\n'
        f'echo "{UP_MARKER} $(hostname) initrd=$(hash_of $initrd)'
        ' pre-v2v=$(hash_of $initrd.pre-v2v)" > /dev/ttyS0\n'
    ),
}
EXECUTABLE = ("usr/local/sbin/transcend-up",)
LINKS = {"etc/systemd/system/multi-user.target.wants/transcend-up.service":
         "/etc/systemd/system/transcend-up.service"}

#: Run by the guest's own tools inside the libguestfs appliance (the disk is /dev/sda there).
GRUB_COMMANDS = ("grub-install --target=i386-pc /dev/sda", "update-grub")


class DebianBuildError(RuntimeError):
    """The Debian guest could not be built; the message carries the failing tool's output."""


@dataclasses.dataclass(frozen=True)
class DebianImage:
    """A built guest in the cache. ``disk_path`` is the shared base: boot a copy."""

    disk_path: Path
    key: str
    kernel_version: str
    initrd_sha256: str  # of /boot/initrd.img-<kernel_version> as built
    build_seconds: float  # of this call: the build, or only the cache look-up


def _run(argv: Sequence[str | os.PathLike[str]], *, env: dict[str, str] | None = None,
         timeout: float = 900) -> str:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "LC_ALL": "C", **(env or {})}, check=False)
    if proc.returncode != 0:
        raise DebianBuildError(f"{' '.join(str(a) for a in argv)} failed ({proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout




def recipe_key() -> str:
    """The cache key: this module's source (packages, files, layout, commands)."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _debootstrap(root: Path, debs: Path) -> None:
    # --cache-dir keeps the .debs: a changed recipe rebuilds without downloading again.
    debs.mkdir(parents=True, exist_ok=True)
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
          f"--cache-dir={debs.resolve()}", SUITE, root, MIRROR],
         env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=1200)


def _mounts_below(path: Path) -> list[str]:
    """Mount points inside ``path``, deepest first (from /proc/self/mountinfo)."""
    prefix = str(path.resolve()) + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """rmtree that never descends into a mount: a debootstrap that died may have left
    /proc, /sys or bind mounts of host device nodes in the chroot."""
    for point in _mounts_below(path):
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
    if left := _mounts_below(path):
        raise DebianBuildError(f"cannot remove {path}: still mounted below it: {left}")
    shutil.rmtree(path, ignore_errors=True)


def _customise(root: Path) -> str:
    """Our files into the tree, the bulk out; returns the kernel version."""
    for rel, text in FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for rel in EXECUTABLE:
        (root / rel).chmod(0o755)
    for rel, target in LINKS.items():
        link = root / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    for rel in PRUNE:
        path = root / rel
        if path.is_dir():
            shutil.rmtree(path)
            path.mkdir()  # apt and dpkg expect the directories
        elif path.exists():
            path.unlink()
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise DebianBuildError(f"expected one kernel in {root / 'boot'}, found {kernels}")
    return kernels[0].name.removeprefix("vmlinuz-")


def _partitioned_raw(root: Path, raw: Path) -> None:
    """An MBR disk with one bootable Linux partition holding ``root`` as ext4, written
    into the file at the partition's offset (no loop device, no mount)."""
    with raw.open("wb") as f:
        f.truncate(DISK_SIZE)
    layout = f"label: dos\nstart={PART_START // 512}, type=83, bootable\n"
    proc = subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(raw)],
                          input=layout, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DebianBuildError(f"sfdisk {raw} failed: {proc.stderr}")
    part_kib = (DISK_SIZE - PART_START) // 1024
    _run(["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-U", ROOT_UUID,
          "-E", f"offset={PART_START},root_owner=0:0", "-d", root, raw, f"{part_kib}k"])


def _install_grub(raw: Path, workdir: Path) -> None:
    """The guest's grub-install and update-grub, run in a libguestfs appliance."""
    script = ["run", "mount /dev/sda1 /"]
    script += [f'command "{c}"' for c in GRUB_COMMANDS]
    script += ["umount-all", "exit"]
    (workdir / "grub.fish").write_text("\n".join(script) + "\n")
    _run(["guestfish", "--format=raw", "-a", raw, "-f", workdir / "grub.fish"],
         env={**libguestfs.environment(), **_operator_env()}, timeout=900)


def _operator_env() -> dict[str, str]:
    # An operator's own libguestfs settings win over the harness defaults.
    return {k: v for k, v in os.environ.items() if k.startswith(("LIBGUESTFS_", "SUPERMIN_"))}


def _build(work: Path, out: Path, debs: Path) -> tuple[str, str]:
    root = work / "root"
    _debootstrap(root, debs)
    kernel_version = _customise(root)
    initrd = _sha256(root / "boot" / f"initrd.img-{kernel_version}")
    raw = work / "disk.raw"
    _partitioned_raw(root, raw)
    _remove_tree(root)  # before the appliance runs: half the disk space
    _install_grub(raw, work)
    out.mkdir()
    _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, out / "disk.qcow2"])
    return kernel_version, initrd


def build_debian_guest(cache_dir: Path | None = None) -> DebianImage:
    """The cached Debian guest, built first if this recipe has no build yet."""
    cache = cache_dir or DEFAULT_CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    key = recipe_key()
    final = cache / f"debian-{key}"
    with file_lock(cache / ".lock"):
        if not (final / "manifest.json").exists():
            work = cache / f".build-{key}"
            _remove_tree(work)
            work.mkdir()
            try:
                out = work / "out"
                kernel_version, initrd = _build(work, out, cache / "debs")
                seconds = time.monotonic() - started
                (out / "manifest.json").write_text(json.dumps(
                    {"key": key, "kernel_version": kernel_version, "initrd_sha256": initrd,
                     "build_seconds": round(seconds, 1)}, indent=2) + "\n")
                shutil.rmtree(final, ignore_errors=True)
                out.rename(final)  # atomic: a build directory is complete or absent
            finally:
                _remove_tree(work)
            for old in cache.glob("debian-*"):  # builds of older recipes
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        for stale in cache.glob(".build-*"):  # left by a killed build (we hold the lock)
            _remove_tree(stale)
        manifest = json.loads((final / "manifest.json").read_text())
    return DebianImage(disk_path=final / "disk.qcow2", key=key,
                       kernel_version=manifest["kernel_version"],
                       initrd_sha256=manifest["initrd_sha256"],
                       build_seconds=time.monotonic() - started)


def make_debian_disk(image: DebianImage, dest: Path) -> Path:
    """A private, standalone copy of the guest's disk to boot (the cache stays pristine)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    _run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "qcow2", image.disk_path, tmp])
    tmp.rename(dest)
    return dest
