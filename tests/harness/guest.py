"""Build the transcend test guest: a small Linux VM whose disk boots by itself under SeaBIOS.

The guest is made only from Debian packages, fetched with ``apt-get download`` and
unpacked with ``dpkg-deb -x`` into a cache directory (nothing is installed on the
host): the Debian cloud kernel (``linux-image-*-cloud-amd64``), ``busybox-static``,
and ``syslinux`` + ``syslinux-common`` + ``mtools`` to make the disk bootable.

Disk layout (MBR, every boundary MiB-aligned; see docs/test-guest.md)::

    0        MBR: syslinux mbr.bin boot code + partition table
    1 MiB    p1  FAT16 (type 0x0e, active)  syslinux, vmlinuz, initrd.img, syslinux.cfg
    33 MiB   p2  ext4  (type 0x83)           root file system, label ``transcend-root``
    65 MiB   p3  raw   (type 0xda)           slot 0: config sector; slot N: record N
    end

Boot path: SeaBIOS -> mbr.bin -> syslinux (p1) -> cloud kernel + harness initramfs
(virtio modules, busybox) -> switch_root to the ext4 root -> busybox init -> the
workload, which prints ``TRANSCEND-GUEST-BOOTED seq=<last record found>`` on ttyS0 and
then appends records at the configured rate until shutdown.  ACPI power button ->
busybox acpid -> ``poweroff`` -> clean shutdown.

Nothing is mounted on the host: the FAT partition is made with ``mformat`` /
``syslinux --install`` / ``mcopy`` on a file, the ext4 partition with
``mkfs.ext4 -d`` on a file, and both are placed at their offsets in a raw image that
``qemu-img convert`` turns into qcow2.

Public API::

    image = build_guest(cache_dir)                      # cached, rebuilt when inputs change
    make_guest_disk(dest, rate=20, record_size=512)     # fresh standalone qcow2 for one VM
    write_guest_config(disk, rate=5)                    # change the workload before boot
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.harness.locks import file_lock

__all__ = [
    "BOOT_MARKER",
    "DEFAULT_CACHE_DIR",
    "DEFAULT_DISK_SIZE",
    "ERROR_MARKER",
    "PROGRESS_MARKER",
    "STOPPED_MARKER",
    "GuestBuildError",
    "GuestConfig",
    "GuestImage",
    "build_guest",
    "guest_packages",
    "make_guest_disk",
    "write_guest_config",
]

#: Default cache directory (override with the ``TRANSCEND_GUEST_CACHE`` environment variable).
DEFAULT_CACHE_DIR = Path(os.environ.get("TRANSCEND_GUEST_CACHE", "/var/cache/transcend-test-guest"))

#: Console lines printed by the guest (always at the start of a line on ttyS0).
BOOT_MARKER = "TRANSCEND-GUEST-BOOTED"
PROGRESS_MARKER = "TRANSCEND-GUEST-PROGRESS"
STOPPED_MARKER = "TRANSCEND-GUEST-STOPPED"
ERROR_MARKER = "TRANSCEND-GUEST-ERROR"
#: "<marker> <interface> <address/prefix>" per global IPv4 address, printed at boot
#: after ``ifup -a`` when the disk has an /etc/network/interfaces (static addresses).
NET_MARKER = "TRANSCEND-GUEST-NET"

#: Bump when the layout or the guest scripts change in a way the cache key would miss.
BUILD_FORMAT = 1

SECTOR = 512
MIB = 1 << 20
BOOT_START = 1 * MIB
BOOT_SIZE = 32 * MIB
ROOT_START = BOOT_START + BOOT_SIZE
ROOT_SIZE = 32 * MIB
RECORDS_START = ROOT_START + ROOT_SIZE
#: Default virtual size of a guest disk; the records partition takes everything after 65 MiB.
DEFAULT_DISK_SIZE = 256 * MIB

ROOT_LABEL = "transcend-root"
BOOT_LABEL = "TRBOOT"
DISK_SIGNATURE = 0x5452534E  # "NSRT" little-endian: arbitrary but fixed
FS_UUID = "7472616e-7363-656e-6400-000000000002"
FAT_SERIAL = "5452424f"

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
HELPER_PACKAGES = ("busybox-static", "syslinux", "syslinux-common", "mtools")
#: Kernel modules the guest loads from its initramfs (those built into the kernel are skipped).
GUEST_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "virtio_net",
    "button",
    "evdev",
)
KERNEL_CMDLINE = "console=ttyS0,115200n8 loglevel=4 panic=-1"
SOURCE_DATE_EPOCH = 1_700_000_000  # fixed timestamp for every file the build writes

CONFIG_MAGIC = "TRANSCEND-GUEST-CONFIG v1"
RECORD_MAGIC = b"TRNSCREC"
#: The constant payload line repeated after the two header lines of a record (64 bytes).
FILL_LINE = b"transcend test guest record payload 0123456789abcdefghijklmnopq\n"
assert len(FILL_LINE) == 64


class GuestBuildError(RuntimeError):
    """The guest could not be built (missing tool, package download failure, ...)."""


@dataclasses.dataclass(frozen=True)
class GuestConfig:
    """Workload settings stored in the config sector (slot 0 of the records partition).

    ``rate`` is records per second (``math.inf`` = as fast as the guest can);
    ``record_size`` is a multiple of 512; record N lives at byte ``N * record_size``
    of the records partition.  A progress line is printed every ``progress_every``
    records.
    """

    rate: float = 10.0
    record_size: int = SECTOR
    progress_every: int = 50

    def __post_init__(self) -> None:
        if not (self.rate > 0):
            raise ValueError(f"rate must be > 0 records/s (math.inf for unthrottled), got {self.rate}")
        if self.record_size < SECTOR or self.record_size % SECTOR or self.record_size > 1 * MIB:
            raise ValueError(f"record_size must be a multiple of 512 in [512, 1 MiB], got {self.record_size}")
        if self.progress_every < 1:
            raise ValueError("progress_every must be >= 1")

    @property
    def interval_us(self) -> int:
        """Microseconds between two records (0 = unthrottled)."""
        return 0 if math.isinf(self.rate) else max(1, round(1_000_000 / self.rate))

    def to_sector(self) -> bytes:
        """The 512-byte config sector as written at the start of the records partition."""
        text = (
            f"{CONFIG_MAGIC}\nrate={self.rate}\nrecord_size={self.record_size}\n"
            f"interval_us={self.interval_us}\nprogress_every={self.progress_every}\n"
        ).encode()
        return text.ljust(SECTOR, b"\0")

    @classmethod
    def from_sector(cls, sector: bytes) -> GuestConfig:
        """Parse a config sector; raises ValueError if it is not one."""
        text = sector.split(b"\0", 1)[0].decode("ascii", "replace")
        if not text.startswith(CONFIG_MAGIC):
            raise ValueError("not a transcend guest config sector")
        values = dict(line.split("=", 1) for line in text.splitlines()[1:] if "=" in line)
        return cls(
            rate=float(values.get("rate", "10")),
            record_size=int(values.get("record_size", str(SECTOR))),
            progress_every=int(values.get("progress_every", "50")),
        )


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A built guest in the cache.

    ``disk_path`` is a base qcow2 disk with the default :class:`GuestConfig`; do not
    boot it directly (use :func:`make_guest_disk` for a private copy).  ``kernel_path``,
    ``initrd_path`` and ``cmdline`` allow direct kernel boot, which is never needed
    because the disk boots by itself.
    """

    cache_dir: Path
    build_dir: Path
    key: str
    disk_path: Path
    boot_partition: Path
    root_partition: Path
    mbr_code: Path
    kernel_path: Path
    initrd_path: Path
    cmdline: str
    kernel_version: str
    packages: tuple[str, ...]
    build_seconds: float

    @property
    def records_offset(self) -> int:
        """Byte offset of the records partition on every guest disk."""
        return RECORDS_START


# --------------------------------------------------------------------------- guest files

INITRAMFS_INIT = r"""#!/bin/busybox sh
# transcend test guest initramfs: load virtio modules, find the ext4 root, switch to it.
/bin/busybox mkdir -p /proc /sys /dev /newroot /tmp
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
fail() {
    echo "@ERROR@ initramfs: $*"
    sleep 2
    poweroff -f
}
while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "transcend initramfs: insmod $m failed"
done < /lib/modules/load.order
i=0
root=
while [ -z "$root" ]; do
    root=$(findfs LABEL=@ROOT_LABEL@ 2>/dev/null)
    [ -n "$root" ] && break
    i=$((i + 1))
    [ $i -gt 300 ] && fail "no partition labelled @ROOT_LABEL@ (have: $(cat /proc/partitions))"
    sleep 0.1
done
mount -t ext4 -o rw,noatime "$root" /newroot || fail "cannot mount $root"
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /sbin/init
"""

INITTAB = """\
::sysinit:/etc/init.d/rcS
::once:/usr/sbin/transcend-workload
::ctrlaltdel:/bin/reboot
::shutdown:/etc/init.d/rcK
"""

RCS = r"""#!/bin/sh
# transcend test guest: system start (busybox init sysinit action)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
grep -q ' /proc ' /proc/mounts 2>/dev/null || mount -t proc proc /proc
grep -q ' /sys ' /proc/mounts || mount -t sysfs sysfs /sys
grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755,size=16m tmpfs /run
mount -t tmpfs -o mode=1777,size=64m tmpfs /tmp
hostname transcend-guest
# the ACPI power button (button.ko + evdev.ko, loaded by the initramfs) -> acpid -> poweroff
i=0
while [ ! -e /dev/input/event0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
acpid -c /etc/acpi -l /run/acpid.log -p /run/acpid.pid
# static network configuration (ifupdown), if the disk has one: the re-IP tests read
# the addresses the guest actually configured from the console
if [ -s /etc/network/interfaces ]; then
    mkdir -p /var/run /etc/network/if-pre-up.d /etc/network/if-up.d
    ifup -a 2>&1 | sed 's/^/transcend guest: ifup: /' >/dev/console
    ip -4 addr show |
        sed -n 's/^ *inet \([0-9./]*\) .*scope global.* \([a-z0-9]*\)$/@NET_MARKER@ \2 \1/p' \
        >/dev/console
fi
"""

RCK = r"""#!/bin/sh
# transcend test guest: system stop (busybox init shutdown action)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
if [ -f /run/transcend-workload.pid ]; then
    pid=$(cat /run/transcend-workload.pid)
    kill -TERM "$pid" 2>/dev/null
    i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
fi
[ -f /run/acpid.pid ] && kill "$(cat /run/acpid.pid)" 2>/dev/null
sync
mount -o remount,ro / 2>/dev/null
echo "transcend guest: root file system clean, powering off"
"""

ACPI_POWER = """#!/bin/sh
exec /bin/poweroff
"""

WORKLOAD = r"""#!/bin/sh
# transcend test guest workload: append sequence-numbered records to the records
# partition at the configured rate.  Record N occupies bytes [N*RS, (N+1)*RS) of the
# partition (RS = record_size from the config sector in slot 0):
#   bytes   0..63   "TRNSCREC <seq %012d> <RS %08d> <md5 hex>\n"
#   bytes  64..127  "boot=<boot id> uptime=<s>" padded with spaces to 63 + "\n"
#   bytes 128..RS   FILL line repeated
# md5 covers bytes 0..30 and 64..RS-1.  Each record is written with O_DIRECT and
# fsync before the next one starts, so any crash-consistent copy holds a contiguous
# prefix 1..N (plus at most one torn record N+1, which fails its checksum).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
exec </dev/null >/dev/console 2>&1
echo $$ > /run/transcend-workload.pid
stop=
trap 'stop=1' TERM INT HUP
fail() {
    echo "@ERROR@ workload: $*"
    exit 1
}

root=$(findfs LABEL=@ROOT_LABEL@) || fail "root partition not found"
case "$root" in
    *[0-9]p2) rec=${root%p2}p3 ;;
    *2) rec=${root%2}3 ;;
    *) fail "unexpected root device $root" ;;
esac
[ -b "$rec" ] || fail "records partition $rec missing"
cfg=$(dd if="$rec" bs=512 count=1 2>/dev/null | tr -d '\000')
case "$cfg" in
    "@CONFIG_MAGIC@"*) ;;
    *) fail "no config sector at the start of $rec" ;;
esac
RS=512
IV=100000
PE=50
for kv in $cfg; do
    case "$kv" in
        record_size=*) RS=${kv#record_size=} ;;
        interval_us=*) IV=${kv#interval_us=} ;;
        progress_every=*) PE=${kv#progress_every=} ;;
    esac
done
sectors=$(cat "/sys/class/block/${rec#/dev/}/size")
max=$((sectors * 512 / RS - 1))
boot=$(cat /proc/sys/kernel/random/boot_id)
boot=${boot%%-*}

yes '@FILL@' | head -c $((RS - 128)) > /tmp/fill

hdr_ok() {
    [ "$(dd if="$rec" bs=30 count=1 skip=$(($1 * RS)) iflag=skip_bytes 2>/dev/null)" = \
      "$(printf 'TRNSCREC %012d %08d' "$1" "$RS")" ]
}
rec_ok() {
    dd if="$rec" of=/tmp/chk bs="$RS" skip="$1" count=1 2>/dev/null || return 1
    [ "$(head -c 30 /tmp/chk)" = "$(printf 'TRNSCREC %012d %08d' "$1" "$RS")" ] || return 1
    want=$(dd if=/tmp/chk bs=1 skip=31 count=32 2>/dev/null)
    got=$({ head -c 31 /tmp/chk; tail -c +65 /tmp/chk; } | md5sum)
    [ "${got%% *}" = "$want" ]
}
# The valid records form a prefix 1..N: binary-search the last valid header, then
# step back over a torn record (valid header, bad checksum).
lo=0
hi=$max
while [ $lo -lt $hi ]; do
    mid=$(((lo + hi + 1) / 2))
    if hdr_ok $mid; then lo=$mid; else hi=$((mid - 1)); fi
done
last=$lo
while [ $last -gt 0 ] && ! rec_ok $last; do
    echo "transcend workload: record $last is torn, rewriting it"
    last=$((last - 1))
done

now_us() {
    read -r up _ < /proc/uptime
    NOW=$(( (${up%.*} * 100 + 1${up#*.} - 100) * 10000 ))
}
write_record() {
    read -r up _ < /proc/uptime
    { printf '%-63s\n' "boot=$boot uptime=$up"; cat /tmp/fill; } > /tmp/body
    printf 'TRNSCREC %012d %08d ' "$1" "$RS" > /tmp/pfx
    sum=$(cat /tmp/pfx /tmp/body | md5sum)
    { printf 'TRNSCREC %012d %08d %s\n' "$1" "$RS" "${sum%% *}"; cat /tmp/body; } > /tmp/rec
    dd if=/tmp/rec of="$rec" bs="$RS" seek="$1" count=1 oflag=direct conv=notrunc,fsync 2>/dev/null
}

echo "@BOOT_MARKER@ seq=$last record_size=$RS interval_us=$IV slots=$max boot=$boot"
n=$((last + 1))
now_us
due=$NOW
while [ -z "$stop" ]; do
    if [ $n -gt $max ]; then
        echo "@ERROR@ workload: records partition full at seq=$max"
        while [ -z "$stop" ]; do sleep 1; done
        break
    fi
    write_record $n || fail "write of record $n failed"
    [ $((n % PE)) -eq 0 ] && echo "@PROGRESS_MARKER@ seq=$n"
    n=$((n + 1))
    [ "$IV" -gt 0 ] || continue
    due=$((due + IV))
    now_us
    if [ $((NOW - due)) -gt 1000000 ]; then
        due=$NOW  # more than 1 s behind: do not burst to catch up
    fi
    while [ -z "$stop" ] && [ $NOW -lt $due ]; do
        d=$((due - NOW))
        [ $d -gt 500000 ] && d=500000
        f=00000$((d % 1000000))
        f=${f#${f%??????}}
        sleep $((d / 1000000)).$f
        now_us
    done
done
echo "@STOPPED_MARKER@ seq=$((n - 1))"
rm -f /run/transcend-workload.pid
"""

SYSLINUX_CFG = """\
SERIAL 0 115200
DEFAULT transcend
PROMPT 0
TIMEOUT 0
SAY transcend test guest: syslinux loading the kernel
LABEL transcend
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND @CMDLINE@
"""


def _render(template: str) -> str:
    values = {
        "@ROOT_LABEL@": ROOT_LABEL,
        "@ERROR@": ERROR_MARKER,
        "@NET_MARKER@": NET_MARKER,
        "@BOOT_MARKER@": BOOT_MARKER,
        "@PROGRESS_MARKER@": PROGRESS_MARKER,
        "@STOPPED_MARKER@": STOPPED_MARKER,
        "@CONFIG_MAGIC@": CONFIG_MAGIC,
        "@FILL@": FILL_LINE.decode().rstrip("\n"),
        "@CMDLINE@": KERNEL_CMDLINE,
    }
    for token, value in values.items():
        template = template.replace(token, value)
    leftover = re.findall(r"@[A-Z_]+@", template)
    assert not leftover, leftover
    return template


# --------------------------------------------------------------------------- helpers


def _run(cmd: Sequence[str | os.PathLike[str]], *, cwd: Path | None = None,
         env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run a command, return stdout; raise GuestBuildError with its output on failure."""
    full_env = dict(os.environ, LC_ALL="C")
    if env:
        full_env.update(env)
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )
    if proc.returncode != 0:
        raise GuestBuildError(
            f"{' '.join(str(c) for c in cmd)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return proc.stdout


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()




def _kernel_package() -> str:
    """The versioned cloud kernel package the meta-package currently depends on."""
    override = os.environ.get("TRANSCEND_GUEST_KERNEL_PACKAGE")
    if override:
        return override
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+-cloud-amd64)\s*$", line)
        if m:
            return m.group(1)
    raise GuestBuildError(f"cannot resolve {KERNEL_META_PACKAGE} with apt-cache: {out!r}")


def guest_packages() -> list[str]:
    """Debian packages the guest is built from (the kernel resolved from the meta-package)."""
    return [_kernel_package(), *HELPER_PACKAGES]


def _fetch_debs(deb_dir: Path, packages: Sequence[str]) -> dict[str, Path]:
    """Ensure the .deb of each package is in ``deb_dir`` (verified by SHA256); return paths.

    Uses ``apt-get download``; needs the apt lists (``apt-get update``) but no root.  If
    apt cannot tell the file name (no lists), falls back to a deb already in the cache.
    """
    deb_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Path] = {}
    try:
        uris = _run(["apt-get", "download", "--print-uris", *packages], cwd=deb_dir)
    except GuestBuildError:
        uris = ""
    wanted: dict[str, tuple[str, str]] = {}
    for line in uris.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[3].startswith("SHA256:"):
            filename = parts[1]
            wanted[filename.split("_", 1)[0]] = (filename, parts[3].split(":", 1)[1])
    missing = []
    for pkg in packages:
        if pkg in wanted:
            filename, sha = wanted[pkg]
            path = deb_dir / filename
            stamp = deb_dir / (filename + ".sha256")
            if path.exists() and stamp.exists() and stamp.read_text().strip() == sha:
                result[pkg] = path
            else:
                missing.append(pkg)
        else:
            cached = sorted(deb_dir.glob(f"{pkg}_*.deb"))
            if not cached:
                raise GuestBuildError(
                    f"apt does not know {pkg} and no cached .deb exists in {deb_dir} "
                    "(run apt-get update?)"
                )
            result[pkg] = cached[-1]
    if missing:
        _run(["apt-get", "download", *missing], cwd=deb_dir, timeout=600)
        for pkg in missing:
            filename, sha = wanted[pkg]
            path = deb_dir / filename
            if not path.exists() or _sha256(path) != sha:
                raise GuestBuildError(f"downloaded {path} is missing or does not match {sha}")
            (deb_dir / (filename + ".sha256")).write_text(sha + "\n")
            result[pkg] = path
    return result


def _extract(deb: Path, dest: Path) -> Path:
    """``dpkg-deb -x`` a package once into ``dest`` (reused while it exists)."""
    done = dest / ".extracted"
    if done.exists():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _run(["dpkg-deb", "-x", deb, tmp])
    (tmp / ".extracted").write_text(deb.name + "\n")
    tmp.rename(dest)
    return dest


def _module_info(path: Path) -> list[str]:
    """Dependencies of a kernel module, read from its .modinfo strings (no kmod needed)."""
    data = path.read_bytes()
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", data)
    if not m or not m.group(1):
        return []
    return [d.decode() for d in m.group(1).split(b",") if d]


def _select_modules(moddir: Path, wanted: Sequence[str]) -> list[Path]:
    """Modules (with dependencies, in load order) for ``wanted``, skipping built-ins."""
    builtin = {
        Path(line.strip()).name.split(".ko")[0].replace("-", "_")
        for line in (moddir / "modules.builtin").read_text().splitlines()
        if line.strip()
    }
    available = {
        p.name.split(".ko")[0].replace("-", "_"): p for p in (moddir / "kernel").rglob("*.ko")
    }
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in available:
            raise GuestBuildError(f"kernel module {name} neither built in nor in {moddir}")
        for dep in _module_info(available[name]):
            visit(dep)
        order.append(available[name])

    for name in wanted:
        visit(name)
    return order


class _Cpio:
    """Minimal deterministic ``newc`` cpio writer (the initramfs format)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, SOURCE_DATE_EPOCH, len(data), 0, 0,
                  rdev[0], rdev[1], len(encoded), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self.buf.write(encoded)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _make_initramfs(busybox: Path, modules: Sequence[Path]) -> bytes:
    cpio = _Cpio()
    for d in ("bin", "dev", "lib", "lib/modules", "proc", "sys", "newroot", "tmp"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("init", _render(INITRAMFS_INIT).encode(), 0o755)
    names = []
    for mod in modules:
        name = mod.name.split(".ko")[0]
        names.append(name)
        cpio.file(f"lib/modules/{name}.ko", mod.read_bytes())
    cpio.file("lib/modules/load.order", ("\n".join(names) + "\n").encode())
    raw = cpio.finish()
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=6) as gz:
        gz.write(raw)
    return out.getvalue()


def _make_rootfs_tree(tree: Path, busybox: Path) -> None:
    for d in ("bin", "sbin", "etc/init.d", "etc/acpi/PWRF", "usr/sbin", "usr/bin", "proc",
              "sys", "dev", "run", "tmp", "root", "var"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(busybox, tree / "bin/busybox")
    (tree / "bin/busybox").chmod(0o755)
    applets = _run([busybox, "--list"]).split()
    for applet in sorted(set(applets)):
        if applet != "busybox":
            (tree / "bin" / applet).symlink_to("busybox")
    (tree / "sbin/init").symlink_to("../bin/busybox")
    files = {
        "etc/inittab": (INITTAB, 0o644),
        "etc/init.d/rcS": (RCS, 0o755),
        "etc/init.d/rcK": (RCK, 0o755),
        "etc/acpi/PWRF/00000080": (ACPI_POWER, 0o755),
        "usr/sbin/transcend-workload": (WORKLOAD, 0o755),
        "etc/hostname": ("transcend-guest\n", 0o644),
        "etc/transcend-guest": (f"transcend test guest, build format {BUILD_FORMAT}\n", 0o644),
    }
    for rel, (text, mode) in files.items():
        path = tree / rel
        path.write_text(_render(text))
        path.chmod(mode)
    for path in sorted(tree.rglob("*"), reverse=True):
        os.utime(path, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH), follow_symlinks=False)
    os.utime(tree, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))


def _make_ext4(tree: Path, out: Path) -> None:
    """ext4 root file system from ``tree`` with ``mkfs.ext4 -d`` (no mount), reproducibly.

    mkfs sorts directory entries; UUID, hash seed and file system times are fixed
    (``E2FSPROGS_FAKE_TIME``); inode ctimes, copied from the host tree, are reset
    with debugfs.
    """
    if out.exists():
        out.unlink()
    env = {"E2FSPROGS_FAKE_TIME": str(SOURCE_DATE_EPOCH), "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)}
    _run(
        ["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-U", FS_UUID,
         "-E", f"hash_seed={FS_UUID},root_owner=0:0", "-b", "1024", "-I", "128",
         "-d", tree, out, f"{ROOT_SIZE // 1024}"],
        env=env,
    )
    paths = ["/", *sorted("/" + str(p.relative_to(tree)) for p in tree.rglob("*"))]
    script = "".join(f"sif {p} ctime @{SOURCE_DATE_EPOCH}\n" for p in paths)
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as cmds:
        cmds.write(script)
        cmds.flush()
        debugfs = shutil.which("debugfs") or "/sbin/debugfs"
        _run([debugfs, "-w", "-f", cmds.name, out], env=env)


def _make_fat(out: Path, files: dict[str, Path], tools_bin: Path) -> None:
    """FAT16 boot partition with syslinux installed, built on a file with mtools."""
    env = {
        "PATH": f"{tools_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "MTOOLS_SKIP_CHECK": "1",
        "MTOOLSRC": "/dev/null",
        "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH),
        "TZ": "UTC",
    }
    with out.open("wb") as f:
        f.truncate(BOOT_SIZE)
    sectors = BOOT_SIZE // SECTOR
    _run([tools_bin / "mformat", "-i", out, "-T", str(sectors), "-h", "64", "-s", "32",
          "-H", str(BOOT_START // SECTOR), "-N", FAT_SERIAL, "-v", BOOT_LABEL, "::"], env=env)
    _run([tools_bin / "syslinux", "--install", out], env=env)
    for name, src in sorted(files.items()):
        os.utime(src, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))
        _run([tools_bin / "mcopy", "-m", "-i", out, src, f"::{name}"], env=env)


def _chs(lba: int) -> bytes:
    heads, spt = 255, 63
    cyl, rem = divmod(lba, heads * spt)
    head, sec = divmod(rem, spt)
    if cyl > 1023:
        cyl, head, sec = 1023, 254, 62
    return bytes([head, ((sec + 1) & 0x3F) | ((cyl >> 2) & 0xC0), cyl & 0xFF])


def _mbr(boot_code: bytes, disk_size: int) -> bytes:
    """MBR: syslinux boot code, fixed disk signature, three partitions (p1 active)."""
    mbr = bytearray(SECTOR)
    mbr[: min(len(boot_code), 440)] = boot_code[:440]
    struct.pack_into("<I", mbr, 440, DISK_SIGNATURE)
    parts = [
        (0x80, 0x0E, BOOT_START, BOOT_SIZE),
        (0x00, 0x83, ROOT_START, ROOT_SIZE),
        (0x00, 0xDA, RECORDS_START, disk_size - RECORDS_START),
    ]
    for i, (status, ptype, start, size) in enumerate(parts):
        first, last = start // SECTOR, (start + size) // SECTOR - 1
        entry = bytes([status]) + _chs(first) + bytes([ptype]) + _chs(last)
        entry += struct.pack("<II", first, last - first + 1)
        mbr[446 + 16 * i : 462 + 16 * i] = entry
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def _copy_into(src: Path, dst: io.BufferedRandom, offset: int) -> None:
    """Copy ``src`` into ``dst`` at ``offset``, skipping all-zero chunks (keeps it sparse)."""
    chunk = 64 * 1024
    zero = bytes(chunk)
    with src.open("rb") as f:
        pos = 0
        while True:
            data = f.read(chunk)
            if not data:
                break
            if data != zero[: len(data)]:
                dst.seek(offset + pos)
                dst.write(data)
            pos += len(data)


def _assemble_raw(image: GuestImage, raw: Path, disk_size: int, config: GuestConfig,
                  root: Path | None = None) -> None:
    if disk_size < RECORDS_START + 2 * MIB or disk_size % MIB:
        raise ValueError(f"disk_size must be a multiple of 1 MiB and >= {RECORDS_START // MIB + 2} MiB")
    if disk_size > 2 * 1024**4:
        raise ValueError("disk_size must be < 2 TiB (MBR)")
    with raw.open("wb+") as f:
        f.truncate(disk_size)
        f.seek(0)
        f.write(_mbr(image.mbr_code.read_bytes(), disk_size))
        _copy_into(image.boot_partition, f, BOOT_START)
        _copy_into(root or image.root_partition, f, ROOT_START)
        f.seek(RECORDS_START)
        f.write(config.to_sector())


def _add_root_files(root: Path, files: dict[str, str]) -> None:
    """Write ``files`` into the ext4 image ``root`` with debugfs (no mount)."""
    with tempfile.TemporaryDirectory() as tmp:
        script = []
        for i, (path, text) in enumerate(sorted(files.items())):
            if not path.startswith("/") or path.endswith("/"):
                raise ValueError(f"root file {path!r} must be an absolute file path")
            local = Path(tmp) / f"f{i}"
            local.write_text(text)
            parts = path.strip("/").split("/")
            for depth in range(1, len(parts)):  # "mkdir" of an existing dir only complains
                script.append("mkdir /" + "/".join(parts[:depth]))
            script += [f"rm {path}", f"write {local} {path}", f"sif {path} mode 0100644"]
        cmds = Path(tmp) / "cmds.debugfs"
        cmds.write_text("\n".join(script) + "\n")
        debugfs = shutil.which("debugfs") or "/sbin/debugfs"
        _run([debugfs, "-w", "-f", str(cmds), str(root)])


def _qcow2_from_raw(raw: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, tmp])
        tmp.rename(dest)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------- public API


def build_guest(cache_dir: Path | str | None = None, *, force: bool = False) -> GuestImage:
    """Build (or reuse) the test guest in ``cache_dir`` and return it.

    The cache key covers the exact .deb files (by SHA256), this module's source and
    :data:`BUILD_FORMAT`; an existing build with the same key is reused.  Safe to call
    from concurrent processes (a lock file serialises builds).  Needs ``apt-get``,
    ``dpkg-deb``, ``mkfs.ext4`` (e2fsprogs >= 1.43) and ``qemu-img`` on the host.
    """
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with file_lock(cache / ".lock"):
        kernel_pkg = _kernel_package()
        debs = _fetch_debs(cache / "debs", [kernel_pkg, *HELPER_PACKAGES])
        key_src = hashlib.sha256()
        key_src.update(f"format={BUILD_FORMAT}\n".encode())
        key_src.update(Path(__file__).read_bytes())
        for pkg in sorted(debs):
            stamp = debs[pkg].with_name(debs[pkg].name + ".sha256")
            digest = stamp.read_text().strip() if stamp.exists() else _sha256(debs[pkg])
            key_src.update(f"{pkg}={debs[pkg].name}:{digest}\n".encode())
        key = key_src.hexdigest()[:16]
        build_dir = cache / f"guest-{key}"
        manifest = build_dir / "manifest.json"
        if manifest.exists() and not force:
            return _image_from_manifest(cache, build_dir, manifest, time.monotonic() - started)
        if build_dir.exists():
            shutil.rmtree(build_dir)
        work = cache / f".build-{key}"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
        try:
            image = _build(cache, work, build_dir, key, debs, kernel_pkg)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        # Keep the .debs and extracted helper packages; drop older guest builds.
        for old in cache.glob("guest-*"):
            if old != build_dir:
                shutil.rmtree(old, ignore_errors=True)
        return dataclasses.replace(image, build_seconds=time.monotonic() - started)


def _build(cache: Path, work: Path, build_dir: Path, key: str, debs: dict[str, Path],
           kernel_pkg: str) -> GuestImage:
    pkgdir = cache / "pkgs"
    helpers = {pkg: _extract(debs[pkg], pkgdir / debs[pkg].name.removesuffix(".deb"))
               for pkg in HELPER_PACKAGES}
    busybox = helpers["busybox-static"] / "bin/busybox"
    tools_bin = work / "tools"
    tools_bin.mkdir()
    for tool in ("syslinux", "mtools"):
        src = (helpers["syslinux"] if tool == "syslinux" else helpers["mtools"]) / "usr/bin" / tool
        shutil.copy2(src, tools_bin / tool)
    for alias in ("mformat", "mcopy", "mattrib", "mmove", "mdir", "mdel"):
        (tools_bin / alias).symlink_to("mtools")
    mbr_bin = helpers["syslinux-common"] / "usr/lib/syslinux/mbr/mbr.bin"

    kroot = work / "kernel"
    _run(["dpkg-deb", "-x", debs[kernel_pkg], kroot])
    vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise GuestBuildError(f"expected one vmlinuz in {debs[kernel_pkg]}, found {vmlinuz}")
    kernel_version = vmlinuz[0].name.removeprefix("vmlinuz-")
    moddir = kroot / "lib/modules" / kernel_version
    modules = _select_modules(moddir, GUEST_MODULES)

    stage = work / "out"
    stage.mkdir()
    kernel = stage / "vmlinuz"
    shutil.copyfile(vmlinuz[0], kernel)
    initrd = stage / "initrd.img"
    initrd.write_bytes(_make_initramfs(busybox, modules))
    cfg = stage / "syslinux.cfg"
    cfg.write_text(_render(SYSLINUX_CFG))
    shutil.copyfile(mbr_bin, stage / "mbr.bin")

    tree = work / "rootfs"
    _make_rootfs_tree(tree, busybox)
    _make_ext4(tree, stage / "root.ext4")
    _make_fat(stage / "boot.fat", {"vmlinuz": kernel, "initrd.img": initrd, "syslinux.cfg": cfg},
              tools_bin)

    image = GuestImage(
        cache_dir=cache, build_dir=build_dir, key=key,
        disk_path=build_dir / "base.qcow2",
        boot_partition=build_dir / "boot.fat", root_partition=build_dir / "root.ext4",
        mbr_code=build_dir / "mbr.bin", kernel_path=build_dir / "vmlinuz",
        initrd_path=build_dir / "initrd.img", cmdline=KERNEL_CMDLINE,
        kernel_version=kernel_version,
        packages=tuple(sorted(d.name for d in debs.values())), build_seconds=0.0,
    )
    staged = dataclasses.replace(
        image, build_dir=stage, disk_path=stage / "base.qcow2",
        boot_partition=stage / "boot.fat", root_partition=stage / "root.ext4",
        mbr_code=stage / "mbr.bin",
    )
    raw = work / "base.raw"
    _assemble_raw(staged, raw, DEFAULT_DISK_SIZE, GuestConfig())
    _qcow2_from_raw(raw, staged.disk_path)
    (stage / "modules.txt").write_text("".join(f"{m.name}\n" for m in modules))
    fields = {f.name: getattr(image, f.name) for f in dataclasses.fields(image)}
    (stage / "manifest.json").write_text(json.dumps(
        {k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items()}, indent=2) + "\n")
    stage.rename(build_dir)
    return image


def _image_from_manifest(cache: Path, build_dir: Path, manifest: Path, seconds: float) -> GuestImage:
    data = json.loads(manifest.read_text())
    paths = {"disk_path", "boot_partition", "root_partition", "mbr_code", "kernel_path",
             "initrd_path"}
    kwargs = {k: (build_dir / Path(v).name if k in paths else v) for k, v in data.items()}
    kwargs.update(cache_dir=cache, build_dir=build_dir, packages=tuple(data["packages"]),
                  build_seconds=seconds)
    return GuestImage(**kwargs)


def make_guest_disk(
    dest_path: Path | str,
    *,
    rate: float = 10.0,
    record_size: int = SECTOR,
    progress_every: int = 50,
    disk_size: int = DEFAULT_DISK_SIZE,
    image: GuestImage | None = None,
    cache_dir: Path | str | None = None,
    root_files: dict[str, str] | None = None,
) -> Path:
    """Write a fresh, standalone qcow2 guest disk at ``dest_path`` and return its path.

    The disk boots by itself (SeaBIOS + syslinux) and its workload writes ``rate``
    records/s of ``record_size`` bytes.  ``disk_size`` (MiB multiple, >= 67 MiB) sets
    the virtual size; the records partition gets everything after 65 MiB.  Builds the
    guest first (``build_guest(cache_dir)``) unless ``image`` is given.  An existing
    file at ``dest_path`` is replaced.  ``root_files`` (absolute path -> text) are
    added to this disk's root file system, e.g. an /etc/network/interfaces.
    """
    config = GuestConfig(rate=rate, record_size=record_size, progress_every=progress_every)
    img = image if image is not None else build_guest(cache_dir)
    dest = Path(dest_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".guest-disk-") as tmp:
        raw = Path(tmp) / "disk.raw"
        root = None
        if root_files:
            root = Path(tmp) / "root.ext4"
            shutil.copyfile(img.root_partition, root)
            _add_root_files(root, root_files)
        _assemble_raw(img, raw, disk_size, config, root)
        _qcow2_from_raw(raw, dest)
    return dest


def write_guest_config(
    disk_path: Path | str,
    *,
    rate: float = 10.0,
    record_size: int = SECTOR,
    progress_every: int = 50,
    fmt: str | None = None,
) -> GuestConfig:
    """Rewrite the workload config sector of an existing guest disk (domain not running).

    Works for any qemu format (via ``qemu-io``).  Changing ``record_size`` on a disk
    that already holds records makes the old records unreadable; change only ``rate``
    there.
    """
    from .records import partition_table  # local import: records imports this module

    config = GuestConfig(rate=rate, record_size=record_size, progress_every=progress_every)
    path = Path(disk_path)
    fmt = fmt or _image_format(path)
    offset = partition_table(path)[2][0]
    with tempfile.NamedTemporaryFile(prefix="transcend-guest-config-") as f:
        f.write(config.to_sector())
        f.flush()
        _run(["qemu-io", "-f", fmt, "-c", f"write -q -s {f.name} {offset} {SECTOR}", path])
    return config


def _image_format(path: Path) -> str:
    info = json.loads(_run(["qemu-img", "info", "-U", "--output=json", path]))
    return str(info["format"])
