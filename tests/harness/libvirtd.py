"""libvirtd for the tests: make sure it runs, and define/boot/stop TCG test-guest domains.

Everything here talks to ``qemu:///system`` as root.  Domains are ``type='qemu'``
(TCG, no /dev/kvm), machine ``pc`` (i440fx), and run QEMU as root without relabelling
(``<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label>``), so disk
images and console logs may live anywhere root can write (pytest's 0700 tmp dirs
included) whatever the user/group/dynamic_ownership settings of qemu.conf.

Typical use::

    status = ensure_libvirtd()
    with running_domain("t-guest", disk, console_log) as dom:
        wait_for_console(console_log, r"TRANSCEND-GUEST-BOOTED seq=(\\d+)", 120)
        shutdown_domain(dom)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import stat
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path

import libvirt

__all__ = [
    "DEFAULT_URI",
    "ConsoleTimeout",
    "DiskSpec",
    "LibvirtdStatus",
    "connect",
    "define_domain",
    "destroy_domain",
    "domain_xml",
    "ensure_libvirtd",
    "read_console",
    "running_domain",
    "shutdown_domain",
    "start_domain",
    "stop_libvirtd",
    "undefine_domain",
    "wait_for_console",
    "wait_for_state",
]

DEFAULT_URI = "qemu:///system"

# libvirt prints connection errors to stderr through its default handler; the
# harness reports them through exceptions instead.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


@dataclasses.dataclass(frozen=True)
class LibvirtdStatus:
    """What :func:`ensure_libvirtd` found or did.

    ``started`` lists the daemons this process started (``"virtlogd"``,
    ``"libvirtd"``); empty if both were already running.
    """

    uri: str
    started: tuple[str, ...]
    version: str


def _try_open(uri: str) -> libvirt.virConnect | None:
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError:
        return None


def _pid_alive(pidfile: Path) -> bool:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return comm == pidfile.stem


def _start_daemon(name: str) -> None:
    exe = shutil.which(name) or f"/usr/sbin/{name}"
    if not Path(exe).exists():
        raise RuntimeError(f"{name} not found; install libvirt-daemon-system")
    proc = subprocess.run(
        [exe, "-d"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
        start_new_session=True, timeout=60, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name} -d failed ({proc.returncode}): {proc.stderr.strip()}")


def ensure_libvirtd(uri: str = DEFAULT_URI, timeout: float = 60.0) -> LibvirtdStatus:
    """Make sure virtlogd and libvirtd run and ``uri`` answers; start them if needed.

    Daemons already running are left alone.  Daemons started here are detached into
    their own session (``-d``) and keep running after the tests; call
    :func:`stop_libvirtd` with the returned status to stop only those.  Raises
    RuntimeError if ``uri`` does not answer within ``timeout`` seconds.
    """
    conn = _try_open(uri)
    started: list[str] = []
    if conn is None:
        if not _pid_alive(Path("/run/virtlogd.pid")):
            _start_daemon("virtlogd")
            started.append("virtlogd")
        if not _pid_alive(Path("/run/libvirtd.pid")):
            _start_daemon("libvirtd")
            started.append("libvirtd")
        deadline = time.monotonic() + timeout
        while conn is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirt at {uri} does not answer after {timeout:.0f} s")
            time.sleep(0.2)
            conn = _try_open(uri)
    try:
        v = conn.getLibVersion()
        version = f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"
    finally:
        conn.close()
    return LibvirtdStatus(uri=uri, started=tuple(started), version=version)


def stop_libvirtd(status: LibvirtdStatus, timeout: float = 30.0) -> None:
    """Stop the daemons that :func:`ensure_libvirtd` started (by their pid files)."""
    for name in reversed(status.started):
        pidfile = Path(f"/run/{name}.pid")
        if not _pid_alive(pidfile):
            continue
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 15)
        deadline = time.monotonic() + timeout
        while _pid_alive(pidfile) and time.monotonic() < deadline:
            time.sleep(0.1)


def connect(uri: str = DEFAULT_URI) -> libvirt.virConnect:
    """Open a libvirt connection (raises libvirt.libvirtError)."""
    return libvirt.open(uri)


@dataclasses.dataclass(frozen=True)
class DiskSpec:
    """One disk of a domain: image path, qemu format, guest target (vda, vdb, ...), bus."""

    path: Path | str
    fmt: str = "qcow2"
    target: str = "vda"
    bus: str = "virtio"
    readonly: bool = False


def domain_xml(
    name: str,
    disk: Path | str | DiskSpec | Sequence[DiskSpec],
    console_log: Path | str,
    *,
    memory_mib: int = 256,
    vcpus: int = 1,
    network: str | None = None,
    kernel: Path | str | None = None,
    initrd: Path | str | None = None,
    cmdline: str | None = None,
    run_as_root: bool = True,
) -> str:
    """Domain XML for a TCG guest.

    ``disk``: a qcow2 path (becomes ``vda`` on virtio, first boot device) or
    :class:`DiskSpec` objects.  The serial port ttyS0 is written to ``console_log``
    (truncated at each start).  ``network``: name of a libvirt network for one
    virtio NIC, or None for no network.  ``kernel``/``initrd``/``cmdline``: direct
    kernel boot instead of booting the disk (not needed by the test guest).
    ``run_as_root``: run QEMU as root without relabelling images (see module doc).
    """
    if isinstance(disk, (str, Path)):
        disks: list[DiskSpec] = [DiskSpec(path=disk)]
    elif isinstance(disk, DiskSpec):
        disks = [disk]
    else:
        disks = list(disk)
    if not disks:
        raise ValueError("at least one disk is needed")

    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "currentMemory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu", placement="static").text = str(vcpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    if kernel is not None:
        ET.SubElement(os_el, "kernel").text = str(kernel)
        if initrd is not None:
            ET.SubElement(os_el, "initrd").text = str(initrd)
        if cmdline is not None:
            ET.SubElement(os_el, "cmdline").text = cmdline
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(dom, "clock", offset="utc")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    emulator = shutil.which("qemu-system-x86_64")
    if emulator:
        ET.SubElement(devices, "emulator").text = emulator
    for i, d in enumerate(disks):
        el = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(el, "driver", name="qemu", type=d.fmt)
        ET.SubElement(el, "source", file=str(d.path))
        ET.SubElement(el, "target", dev=d.target, bus=d.bus)
        if d.readonly:
            ET.SubElement(el, "readonly")
        if i == 0 and kernel is None:
            ET.SubElement(el, "boot", order="1")
    if any(d.bus == "scsi" for d in disks):
        ET.SubElement(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    ET.SubElement(devices, "controller", type="usb", model="none")
    if network is not None:
        iface = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(iface, "source", network=network)
        ET.SubElement(iface, "model", type="virtio")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console_log), append="off")
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "memballoon", model="none")
    if run_as_root:
        sec = ET.SubElement(dom, "seclabel", type="static", model="dac", relabel="no")
        ET.SubElement(sec, "label").text = "+0:+0"
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def _conn(conn: libvirt.virConnect | None) -> libvirt.virConnect:
    return conn if conn is not None else connect()


def define_domain(xml: str, conn: libvirt.virConnect | None = None) -> libvirt.virDomain:
    """Define (persistently) a domain from XML; returns it, not started."""
    return _conn(conn).defineXML(xml)


def start_domain(dom: libvirt.virDomain) -> None:
    """Start a defined domain."""
    dom.create()


def wait_for_state(dom: libvirt.virDomain, state: int, timeout: float) -> bool:
    """Wait until the domain reaches ``state`` (e.g. ``libvirt.VIR_DOMAIN_SHUTOFF``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if dom.state()[0] == state:
                return True
        except libvirt.libvirtError:
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def shutdown_domain(dom: libvirt.virDomain, timeout: float = 60.0, *, force: bool = True) -> bool:
    """ACPI shutdown (the guest powers off cleanly) and wait for shut-off.

    Returns True if the guest powered off by itself within ``timeout``; otherwise,
    with ``force``, destroys it and returns False.
    """
    if not dom.isActive():
        return True
    with contextlib.suppress(libvirt.libvirtError):
        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    if wait_for_state(dom, libvirt.VIR_DOMAIN_SHUTOFF, timeout):
        return True
    if force:
        destroy_domain(dom)
    return False


def destroy_domain(dom: libvirt.virDomain) -> None:
    """Hard power-off (no error if already off)."""
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        if dom.isActive():
            raise


def undefine_domain(dom: libvirt.virDomain) -> None:
    """Destroy if running, then undefine together with checkpoint/snapshot metadata."""
    destroy_domain(dom)
    flags = (
        libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    )
    try:
        dom.undefineFlags(flags)
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise


def remove_domain_if_exists(name: str, conn: libvirt.virConnect | None = None) -> None:
    """Destroy and undefine a leftover domain called ``name`` (no error if absent)."""
    try:
        dom = _conn(conn).lookupByName(name)
    except libvirt.libvirtError:
        return
    undefine_domain(dom)


@contextlib.contextmanager
def running_domain(
    name: str,
    disk: Path | str | DiskSpec | Sequence[DiskSpec],
    console_log: Path | str,
    *,
    conn: libvirt.virConnect | None = None,
    **xml_options: object,
) -> Iterator[libvirt.virDomain]:
    """Define and start a domain; on exit (also on error) destroy and undefine it.

    A leftover domain with the same name (from an earlier crashed run) is removed
    first.  ``xml_options`` go to :func:`domain_xml`.
    """
    c = _conn(conn)
    remove_domain_if_exists(name, c)
    Path(console_log).parent.mkdir(parents=True, exist_ok=True)
    dom = define_domain(domain_xml(name, disk, console_log, **xml_options), c)  # type: ignore[arg-type]
    try:
        start_domain(dom)
        yield dom
    finally:
        undefine_domain(dom)
        if conn is None:
            c.close()


class ConsoleTimeout(TimeoutError):
    """The pattern did not appear on the console in time (message holds the console tail)."""


def read_console(path: Path | str) -> str:
    """The console log so far (empty if it does not exist yet)."""
    try:
        return Path(path).read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def wait_for_console(
    path: Path | str,
    pattern: str | re.Pattern[str],
    timeout: float,
    *,
    start: int = 0,
    fail_pattern: str | re.Pattern[str] | None = None,
    domain: libvirt.virDomain | None = None,
) -> re.Match[str]:
    """Wait until ``pattern`` (a regex, multiline) matches the console log after offset ``start``.

    Returns the match (``match.end() + start`` is where to continue waiting).  Raises
    :class:`ConsoleTimeout` after ``timeout`` seconds, AssertionError at once if
    ``fail_pattern`` appears or if ``domain`` is given and stops running; both
    messages include the end of the console log.
    """
    rx = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
    frx = (re.compile(fail_pattern, re.MULTILINE) if isinstance(fail_pattern, str)
           else fail_pattern)
    deadline = time.monotonic() + timeout
    while True:
        text = read_console(path)[start:]
        m = rx.search(text)
        if m:
            return m
        if frx is not None and (fm := frx.search(text)):
            raise AssertionError(f"console {path}: {fm.group(0)!r}\n--- console tail ---\n{text[-3000:]}")
        if domain is not None and not domain.isActive():
            raise AssertionError(
                f"domain {domain.name()} stopped before {rx.pattern!r} appeared\n"
                f"--- console tail ---\n{text[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise ConsoleTimeout(
                f"{rx.pattern!r} not on console {path} after {timeout:.0f} s\n"
                f"--- console tail ---\n{text[-3000:]}"
            )
        time.sleep(0.2)


@contextlib.contextmanager
def traversable(path: Path) -> Iterator[None]:
    """Let the unprivileged qemu user reach ``path`` (pytest's tmp dirs are 0700).

    Only ``path`` itself gets its mode back afterwards. Its parents (pytest's base
    directories) keep search permission: they are shared with tests of other pytest
    sessions running at the same time, whose VMs would lose access if one test put
    0700 back; search-only permission lets nobody list them."""
    changed = []
    for p in [path, *path.parents]:
        mode = stat.S_IMODE(p.stat().st_mode)
        if not mode & stat.S_IXOTH:
            os.chmod(p, mode | stat.S_IXOTH)
            if p == path:
                changed.append((p, mode))
    try:
        yield
    finally:
        for p, mode in changed:
            os.chmod(p, mode)
