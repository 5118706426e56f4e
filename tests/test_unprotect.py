"""Unprotect leaves nothing behind at the source, and only removes its own (issue #16).

One KVM domain protected twice (one VM to two targets, a feature operators pay
for), by protections whose names are prefixes of each other. Removing one removes
its libvirt checkpoints and their persistent dirty bitmaps from the production
image; the other keeps its own and its next cycle stays incremental, with the
right bytes. The domain idles without an OS (tests/harness/drkit.py): no guest
boot is needed to prove this."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import libvirt
import libvirt_qemu
import pytest

from connectors.common.qemu import export_sha256
from connectors.registry import target_for
from tests.harness.drkit import KvmKit, MiB, vm_name
from tests.harness.libvirtd import traversable
from tests.harness.protect import protection_spec, start_protection, status, sync_now, wait_first_point
from tests.harness.stack import Stack
from transcend.api import ReplicationStatus
from transcend.catalog import Catalog
from transcend.models import ChangeKind, RecoveryPoint

pytestmark = [pytest.mark.guest]

G = 64 * 1024


def _data(seed: int, n: int) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))[:n]


def _owned(names: list[str], protection: str) -> list[str]:
    prefix = f"transcend.{protection}."
    return [n for n in names if n.startswith(prefix) and "." not in n[len(prefix):]]


def _bitmaps(dom: libvirt.virDomain) -> list[str]:
    """The dirty bitmaps QEMU holds on the domain's block nodes (the live view: a
    running image's header lists persistent bitmaps only once QEMU closes it)."""
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(
        dom, '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}', 0))
    return sorted({b["name"] for node in reply["return"] for b in node.get("dirty-bitmaps", [])})


def _point_sha(cat: Catalog, point: RecoveryPoint) -> str:
    prot = cat.get_protection(point.protection)
    info = cat.get_platform(prot.spec.target_platform)
    target = target_for(info, cat.platform_secret(info.name))
    ep = target.open(point, point.disks[0].disk)
    try:
        return export_sha256(ep.uri)
    finally:
        target.close(point, point.disks[0].disk)


@pytest.mark.timeout(600)
def test_unprotect_removes_its_own_tracking_and_only_its_own(stack: Stack, tmp_path: Path) -> None:
    with traversable(tmp_path):
        asyncio.run(_unprotect(stack, tmp_path))


async def _unprotect(stack: Stack, tmp_path: Path) -> None:
    cat = stack.catalog()
    client = await stack.client()
    kit = KvmKit(tmp_path / "kvm")
    try:
        for name in ("src", "dst1", "dst2"):
            kit.add_platform(cat, name)
        vm = kit.make_vm(vm_name("kvm", "unprotect"), [16 * MiB])
        kit.write(vm, 0, 0, _data(1, MiB))
        # "ux" is a prefix of "ux.b": removing ux must not take ux.b's checkpoints
        gone = await start_protection(client, protection_spec("ux", vm.name, "src", "dst1"))
        kept = await start_protection(client, protection_spec("ux.b", vm.name, "src", "dst2"))
        for h in (gone, kept):
            st = await wait_first_point(h, 300)
            assert st.cycles_failed == 0, st.last_error
        kit.write(vm, 0, 4 * MiB, _data(2, G))
        for h in (gone, kept):
            st = await sync_now(h)
            assert st.cycles_failed == 0, st.last_error
        dom = kit.conn.lookupByName(vm.name)
        checkpoints = [c.getName() for c in dom.listAllCheckpoints(0)]
        assert _owned(checkpoints, "ux") and _owned(checkpoints, "ux.b"), checkpoints

        removed = await gone.execute_update("remove", result_type=ReplicationStatus)
        await gone.result()
        assert removed.last_error == "", removed.last_error

        checkpoints = [c.getName() for c in dom.listAllCheckpoints(0)]
        assert _owned(checkpoints, "ux") == [], checkpoints
        assert len(_owned(checkpoints, "ux.b")) == 1, checkpoints
        bitmaps = _bitmaps(dom)
        assert _owned(bitmaps, "ux") == [], bitmaps
        assert _owned(bitmaps, "ux.b") == _owned(checkpoints, "ux.b"), bitmaps
        # nothing of ux's is left in the source's work directory either
        work = tmp_path / "kvm" / "src" / "work"
        leftovers = [p.name for p in work.rglob("*") if ".ux." in p.name or p.name.startswith("ux")]
        assert leftovers == [], leftovers

        # the other protection carries on incrementally, with the right bytes
        kit.write(vm, 0, 8 * MiB, _data(3, G))
        st = await sync_now(kept)
        assert st.cycles_failed == 0, st.last_error
        point = cat.get_point((await status(kept)).last_point_id or "")
        assert point.kind == ChangeKind.INCREMENTAL, point
        assert point.bytes_written == G, point.bytes_written
        assert _point_sha(cat, point) == vm.sha256()[0]
    finally:
        kit.close()
