"""A successful guest conversion end to end (issue #4): ``virt-v2v-in-place`` on the
overlay of a point, before the recovered VM's first boot; the point is untouched.

The guest is a real Debian 12 installation (tests/harness/debian_guest.py) that
virt-v2v can inspect. It runs under libvirt, is protected to a KVM replica, and the
first point is test-failed-over with ``convert="always"``. What proves the
conversion, beyond the product saying so in ``Instance.prepared``: virt-v2v
rebuilds a Debian guest's initramfs (with the virtio drivers) and keeps the old one
as ``/boot/initrd.img-<version>.pre-v2v``. The guest's boot line reports the
SHA-256 of both files: the source guest booted the initramfs as built (and has no
``.pre-v2v``); the recovered one boots a *different* initramfs, and its
``.pre-v2v`` is byte-identical to the one built. The point's layers are
byte-identical before and after, and nothing is left after the cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.harness.debian_guest import HOSTNAME, UP_MARKER, DebianImage, build_debian_guest, make_debian_disk
from tests.harness.libvirtd import (
    DiskSpec,
    ensure_libvirtd,
    remove_domain_if_exists,
    running_domain,
    traversable,
    wait_for_console,
)
from tests.harness.protect import (
    add_kvm_platforms,
    protection_spec,
    source_network,
    start_protection,
    wait_first_point,
    wait_phase,
)
from tests.harness.stack import Stack
from transcend import api
from transcend.api import CONTROL_TASK_QUEUE, HealthCheck

# "TRANSCEND-DEBIAN-UP <hostname> initrd=<sha256> pre-v2v=<sha256|none>"
UP_LINE = re.compile(rf"^{UP_MARKER} (\S+) initrd=([0-9a-f]{{64}}) pre-v2v=([0-9a-f]{{64}}|none)\r?$",
                     re.MULTILINE)
CONVERTED = "converted for KVM (virt-v2v-in-place)"
BOOT_TIMEOUT = 300  # a TCG boot of the Debian guest takes ~15 s here
PROTECTION = "conv"


@pytest.fixture(scope="module")
def debian_image() -> DebianImage:
    """libvirtd running and the Debian guest built (cached across runs; ~1 min cold)."""
    ensure_libvirtd()
    return build_debian_guest()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _domain_names() -> set[str]:
    conn = libvirt.open("qemu:///system")
    try:
        return {d.name() for d in conn.listAllDomains(0)}
    finally:
        conn.close()


def _recovered_name() -> str:
    # libvirt domain names are host-wide: unique per test process
    return f"conv-test-{os.getpid()}"


def _up_lines(console: str) -> list[tuple[str, str, str]]:
    """(hostname, initrd hash, pre-v2v hash) of every boot line on a console."""
    return [(m.group(1), m.group(2), m.group(3)) for m in UP_LINE.finditer(console)]


@contextlib.contextmanager
def _booted_debian(image: DebianImage, workdir: Path, name: str, network: str
                   ) -> Iterator[libvirt.virDomain]:
    """The source: a private copy of the Debian guest running under libvirt, with a
    NIC (the recovered VM then gets one on the isolated network); removed on exit."""
    disk = make_debian_disk(image, workdir / "src.qcow2")
    console = workdir / "console.log"
    with running_domain(name, DiskSpec(path=disk, target="vda"), console, network=network,
                        memory_mib=512) as dom:
        wait_for_console(console, UP_LINE, BOOT_TIMEOUT, domain=dom)
        yield dom


@pytest.mark.guest
@pytest.mark.timeout(1800)
def test_conversion_of_a_debian_guest(debian_image: DebianImage, stack: Stack, tmp_path: Path) -> None:
    with traversable(tmp_path):
        try:
            asyncio.run(_conversion(debian_image, stack, tmp_path))
        finally:
            # A failed assertion before the cleanup signal leaves the recovered VM
            # running: remove it (its overlays go with tmp_path).
            remove_domain_if_exists(_recovered_name())


async def _conversion(image: DebianImage, stack: Stack, tmp_path: Path) -> None:
    vm, p = f"transcend-conv-{os.getpid()}", PROTECTION
    cat = stack.catalog()
    src, dst = add_kvm_platforms(cat, tmp_path / "replicas")
    client = await stack.client()
    with source_network(f"transcend-cnv-{os.getpid() % 10000}") as net, \
            _booted_debian(image, tmp_path, vm, net):
        # The source booted the initramfs as built, and virt-v2v never ran on it.
        source_lines = _up_lines((tmp_path / "console.log").read_text(errors="replace"))
        assert source_lines == [(HOSTNAME, image.initrd_sha256, "none")], source_lines

        await wait_first_point(await start_protection(client, protection_spec(p, vm, src, dst)))
        point = cat.latest_point(p)
        assert point is not None
        before = {d.disk: _sha256(d.location) for d in point.disks}

        health = HealthCheck(kind="console", pattern=rf"^{UP_MARKER} {HOSTNAME} ",
                             timeout_seconds=BOOT_TIMEOUT)
        handle = await client.start_workflow(
            api.TEST_FAILOVER_WORKFLOW,
            api.TestFailoverInput(protection=p, point_id=point.id, health=health, keep_seconds=900,
                                  name=_recovered_name(), convert="always"),
            id=api.test_failover_id(p), task_queue=CONTROL_TASK_QUEUE,
            result_type=api.TestFailoverStatus)
        try:
            running = await wait_phase(handle, api.TestFailoverStatus, {"running", "failed"}, 1200)
            assert running.phase == "running", running
            (recovered,) = running.vms
            assert recovered.healthy_at >= recovered.booted_at
            instance = recovered.instance
            assert CONVERTED in instance.prepared, instance.prepared
            assert instance.name == _recovered_name() and instance.name in _domain_names()

            # What the recovered guest booted: a new initramfs, the old one kept by
            # virt-v2v byte for byte.
            lines = _up_lines(Path(instance.console_log).read_text(errors="replace"))
            assert lines, "no boot line on the recovered VM's console"
            host, initrd, pre_v2v = lines[0]
            assert host == HOSTNAME
            assert initrd != image.initrd_sha256, "the recovered guest booted the unconverted initramfs"
            assert pre_v2v == image.initrd_sha256, (pre_v2v, image.initrd_sha256)
            assert all(line == lines[0] for line in lines), lines  # a firstboot reboot: same files
            boot_dir = tmp_path / "replicas" / p / ".boot" / instance.name
            overlays = sorted(boot_dir.glob("*.qcow2"))
            assert overlays, f"no overlay in {boot_dir}"
        except BaseException:
            # A failed check: still let the workflow remove what it booted.
            with contextlib.suppress(Exception):
                await handle.signal("cleanup")
                await asyncio.wait_for(handle.result(), 300)
            raise
        await handle.signal("cleanup")
        await asyncio.wait_for(handle.result(), 300)
        assert instance.name not in _domain_names()
        assert not boot_dir.exists()
        assert not any(o.exists() for o in overlays)
        # The conversion wrote the overlay only: the point is byte-identical.
        assert {d.disk: _sha256(d.location) for d in point.disks} == before
