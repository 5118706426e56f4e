"""Preparing a recovered guest before its first boot: conversion and re-IP.

Both work on the *overlay* a boot creates over a point's layers, never on the point:
the point's layers are the overlay's read-only backing files, so whatever is
changed lands in the overlay only (and is gone with it).

* **Conversion** (``virt-v2v-in-place``, libguestfs): when the guest comes from
  another hypervisor (VMware → KVM), its drivers, bootloader and initramfs are
  adapted for KVM's virtio devices. Skipped for KVM → KVM. A failure carries the
  tool's log.
* **Re-IP**: the recovery site's network has other subnets. A rule
  ``from_cidr → to_cidr`` (same prefix length) moves every static IPv4 address that
  lies in ``from_cidr`` to the same host offset in ``to_cidr`` (10.1.2.7/24 with
  10.1.2.0/24 → 192.168.9.0/24 becomes 192.168.9.7/24; a gateway or DNS server in
  that subnet moves the same way), in the guest's network configuration files:
  ifupdown (``/etc/network/interfaces``, ``interfaces.d``), netplan, RHEL
  ``ifcfg-*`` and NetworkManager keyfiles. DHCP configurations have no static
  address and stay as they are.

libguestfs boots a small appliance VM to reach the guest's file systems. On a
host without a kernel in /boot, point ``SUPERMIN_KERNEL``, ``SUPERMIN_MODULES``
and ``SUPERMIN_KERNEL_VERSION`` at one; where nested KVM fails, set
``LIBGUESTFS_BACKEND_SETTINGS=force_tcg`` (docs/dr-operations.md).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CONFIG_GLOBS = (
    "/etc/network/interfaces",
    "/etc/network/interfaces.d/*",
    "/etc/netplan/*.yaml",
    "/etc/sysconfig/network-scripts/ifcfg-*",
    "/etc/NetworkManager/system-connections/*.nmconnection",
)
MOUNTABLE = ("ext2", "ext3", "ext4", "xfs", "btrfs")
LOG_TAIL = 4000
#: Guest families (Capabilities.guest_family) a guest can be converted to before its
#: first boot: virt-v2v-in-place installs virtio drivers (KVM, CloudStack, Nutanix AHV)
#: and nothing else.
CONVERTS_TO: frozenset[str] = frozenset({"kvm"})
# An IPv4 address as a token: not part of a longer dotted number or a version string.
IPV4 = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.]*\d)")


class GuestPrepError(Exception):
    """The guest could not be prepared; the message says why and carries the log."""


class ReIpRule(BaseModel):
    """Move static addresses of one subnet to another, keeping each host's offset."""

    model_config = ConfigDict(extra="forbid")

    from_cidr: str = Field(description="source subnet, e.g. 10.1.2.0/24")
    to_cidr: str = Field(description="recovery subnet of the same prefix length")

    @field_validator("from_cidr", "to_cidr")
    @classmethod
    def _network(cls, v: str) -> str:
        try:
            return str(ipaddress.IPv4Network(v, strict=True))
        except ValueError as e:
            raise ValueError(f"{v!r} is not an IPv4 subnet like 10.1.2.0/24: {e}") from e

    @model_validator(mode="after")
    def _same_length(self) -> ReIpRule:
        a, b = ipaddress.IPv4Network(self.from_cidr), ipaddress.IPv4Network(self.to_cidr)
        if a.prefixlen != b.prefixlen:
            raise ValueError(f"re-IP {self.from_cidr} -> {self.to_cidr}: both subnets need the "
                             "same prefix length (each host keeps its offset)")
        return self

    def translate(self, address: ipaddress.IPv4Address) -> ipaddress.IPv4Address | None:
        a, b = ipaddress.IPv4Network(self.from_cidr), ipaddress.IPv4Network(self.to_cidr)
        if address not in a:
            return None
        return b.network_address + (int(address) - int(a.network_address))


class GuestPrep(BaseModel):
    """What to do to a recovered guest before its first boot."""

    model_config = ConfigDict(extra="forbid")

    convert: bool = False
    reip: list[ReIpRule] = Field(default_factory=list)

    def needed(self) -> bool:
        return self.convert or bool(self.reip)


def translate_text(text: str, rules: list[ReIpRule]) -> tuple[str, list[str]]:
    """``text`` with every IPv4 address some rule matches moved; and what moved."""
    moved: list[str] = []

    def one(m: re.Match[str]) -> str:
        try:
            address = ipaddress.IPv4Address(m.group(1))
        except ValueError:
            return m.group(0)
        for rule in rules:
            new = rule.translate(address)
            if new is not None:
                moved.append(f"{address} -> {new}")
                return str(new)
        return m.group(0)

    return IPV4.sub(one, text), moved


# --------------------------------------------------------------------------- libguestfs


def _env() -> dict[str, str]:
    # The direct backend: libguestfs runs QEMU itself, needing no libvirtd session.
    return {**os.environ, "LIBGUESTFS_BACKEND": os.environ.get("LIBGUESTFS_BACKEND", "direct")}


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise GuestPrepError(f"{tool} is not installed on this worker's host; install the "
                             f"Debian package {package} (scripts/setup.sh does)")
    return path


class Guestfish:
    """One libguestfs appliance (``guestfish --listen``) for a sequence of commands: the
    appliance boots once, however many files are read and written."""

    def __init__(self, pid: int, log: Path) -> None:
        self.pid, self.log = pid, log

    def __call__(self, *args: str) -> str:
        proc = subprocess.run(["guestfish", f"--remote={self.pid}", "--", *args],
                              capture_output=True, text=True, env=_env(), timeout=600)
        if proc.returncode != 0:
            raise GuestPrepError(f"guestfish {' '.join(args)} failed: "
                                 f"{(proc.stderr or proc.stdout).strip()[-LOG_TAIL:]}")
        return proc.stdout


@contextmanager
def guestfish(disks: list[str], workdir: Path) -> Iterator[Guestfish]:
    """The disks attached read-write to a running appliance; it is shut down on exit."""
    _need("guestfish", "libguestfs-tools")
    log = workdir / "guestfish.log"
    argv = ["guestfish", "--listen"]
    for d in disks:
        argv += ["-a", d]
    with log.open("w") as err:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=_env(),
                              timeout=120)
    m = re.search(r"GUESTFISH_PID=(\d+)", proc.stdout)
    if proc.returncode != 0 or m is None:
        raise GuestPrepError(f"starting libguestfs failed: {log.read_text()[-LOG_TAIL:]}")
    g = Guestfish(int(m.group(1)), log)
    try:
        try:
            g("run")
        except GuestPrepError as e:
            raise GuestPrepError(f"{e} (on a host without a kernel in /boot set SUPERMIN_KERNEL; "
                                 "where nested KVM fails set LIBGUESTFS_BACKEND_SETTINGS="
                                 "force_tcg)") from e
        yield g
    finally:
        subprocess.run(["guestfish", f"--remote={g.pid}", "--", "exit"], capture_output=True,
                       env=_env(), timeout=60, check=False)


def apply_reip(disks: list[str], rules: list[ReIpRule], workdir: Path) -> list[str]:
    """Re-IP the guest on ``disks`` (overlays); returns what changed, file by file."""
    changes: list[str] = []
    with guestfish(disks, workdir) as g:
        filesystems = [line.split(": ", 1) for line in g("list-filesystems").splitlines()
                       if ": " in line]
        for device, fstype in filesystems:
            if fstype.strip() not in MOUNTABLE:
                continue
            try:
                g("mount", device, "/")
            except GuestPrepError:
                continue  # not mountable (a swap, a damaged fs): nothing of ours there
            try:
                changes += _reip_mounted(g, device, rules, workdir)
            finally:
                g("umount-all")
    return changes


def _reip_mounted(g: Guestfish, device: str, rules: list[ReIpRule], workdir: Path) -> list[str]:
    changes = []
    for pattern in CONFIG_GLOBS:
        for path in g("glob-expand", pattern).splitlines():
            if not path or g("is-file", path).strip() != "true":
                continue
            local = workdir / "file"
            g("download", path, str(local))
            text = local.read_text(errors="surrogateescape")
            new, moved = translate_text(text, rules)
            if moved:
                local.write_text(new, errors="surrogateescape")
                g("upload", str(local), path)
                changes.append(f"{device}:{path}: {', '.join(moved)}")
    return changes


def convert(disks: list[str], workdir: Path) -> str:
    """``virt-v2v-in-place`` on the overlays: the guest adapted to KVM. Returns the
    tool's log; a failure raises with its tail."""
    tool = _need("virt-v2v-in-place", "virt-v2v")
    log = workdir / "virt-v2v.log"
    argv = [tool, "-i", "disk", *disks]
    with log.open("w") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=_env(),
                              timeout=3600, check=False)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise GuestPrepError(f"guest conversion failed (virt-v2v-in-place exit "
                             f"{proc.returncode}); its log ends:\n{text[-LOG_TAIL:]}")
    return text


def prepare_guest(disks: list[str], prep: GuestPrep) -> list[str]:
    """Convert, then re-IP, the guest on ``disks`` (a boot's overlays). Returns what
    was done, for the operation's status."""
    done: list[str] = []
    with tempfile.TemporaryDirectory(prefix="transcend-guestprep-") as tmp:
        workdir = Path(tmp)
        if prep.convert:
            convert(disks, workdir)
            done.append("converted for KVM (virt-v2v-in-place)")
        if prep.reip:
            changes = apply_reip(disks, prep.reip, workdir)
            # Not an error: in a group one rule set serves every VM, and a VM on DHCP
            # has nothing to move. The status says so, for the operator to check.
            done += [f"re-IP {c}" for c in changes] or [
                "re-IP: no static address in " + ", ".join(r.from_cidr for r in prep.reip)
                + " in the guest's network configuration"]
    return done
