"""AWS through the real workflows: the Temporal dev server, a worker process, and the
local EC2 + EBS direct model (tests/harness/aws/) reached only through boto3.

AWS -> KVM: a two-volume instance; each point byte-identical to the volumes at their
snapshot; an incremental cycle reads exactly the changed 512 KiB blocks; throttling
and 5xx storms slow the copy but lose nothing; a deleted checkpoint snapshot turns
into a resync that writes only the blocks that differ; unprotect leaves no snapshot.

KVM -> AWS: points are EBS snapshot chains, read back through boto3 by the test (not
by the product); retention deletes the oldest point and the next one keeps its bytes;
an aborted cycle and a removed protection leave no pending or stray snapshot."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from connectors.registry import source_for
from tests.harness.aws import AwsSim, aws_sim
from tests.harness.conformance import aws_platform
from tests.harness.drkit import KvmKit
from tests.harness.protect import (
    add_kvm_platforms,
    images_identical,
    point_path,
    protection_spec,
    start_protection,
    sync_now,
    verify_point,
    wait_first_point,
)
from tests.harness.stack import Stack
from transcend.api import ReplicationStatus
from transcend.catalog import Catalog
from transcend.models import ChangeKind, PlatformKind, PlatformSpec

MiB = 1 << 20
G = 64 * 1024
EBS_BLOCK = 512 * 1024


def _data(seed: int, n: int) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))[:n]


def _add_aws(cat: Catalog, sim: AwsSim, name: str, tmp: Path) -> None:
    info, secret = aws_platform(sim, name, tmp)
    cat.add_platform(PlatformSpec(name=name, kind=PlatformKind.AWS, site="local",
                                  config=info.config, secret=secret), replace=True)


def _transcend_snapshots(sim: AwsSim) -> list[dict[str, Any]]:
    """Snapshots carrying a transcend tag, as the model lists them (not through the product)."""
    def keys(tags: Any) -> list[str]:
        return list(tags) if isinstance(tags, dict) else [t.get("key", "") for t in tags or []]

    return [s for s in sim.resources()["snapshots"]
            if any(str(k).startswith("transcend:") for k in keys(s.get("tags")))]


def _calls(sim: AwsSim, api: str, what: str = "served") -> int:
    return int(sim.stats()["calls"].get(api, {}).get(what, 0))


@pytest.fixture
def sim(tmp_path: Path) -> Any:
    with aws_sim(tmp_path / "aws") as s:
        yield s


def test_aws_to_kvm_full_incremental_throttled_and_resync(stack: Stack, sim: AwsSim,
                                                          tmp_path: Path) -> None:
    asyncio.run(_aws_to_kvm(stack, sim, tmp_path))


async def _aws_to_kvm(stack: Stack, sim: AwsSim, tmp_path: Path) -> None:
    cat = stack.catalog()
    _add_aws(cat, sim, "ec2", tmp_path)
    _, target = add_kvm_platforms(cat, tmp_path / "replicas")
    instance = sim.make_instance("web", volume_gib=[1, 1])
    vols = sim.volume_ids(instance)
    sim.write(vols[0], 0, _data(1, 3 * MiB))
    sim.write(vols[0], 700 * MiB + 4096, _data(2, 100_000))
    sim.write(vols[1], 5 * MiB, _data(3, MiB))

    def expected() -> list[Path]:
        out = []
        for i, v in enumerate(vols):
            p = tmp_path / f"expected{i}.raw"
            shutil.copyfile(sim.volume_path(v), p)
            out.append(p)
        return out

    def identical(point_id: str) -> None:
        point = cat.get_point(point_id)
        for pd, exp in zip(point.disks, expected(), strict=True):
            same, text = images_identical(point_path(point, pd.disk), exp)
            assert same, (pd.disk, text)

    client = await stack.client()
    handle = await start_protection(client, protection_spec("web", instance, "ec2", target))
    st = await wait_first_point(handle, 300)
    assert st.cycles_failed == 0, st.last_error
    first = cat.get_point(st.last_point_id or "")
    assert first.kind == ChangeKind.FULL and len(first.disks) == 2
    identical(first.id)
    assert len(_transcend_snapshots(sim)) == 2  # the checkpoints, one per volume

    # Incremental: exactly the changed 512 KiB blocks are read through EBS direct.
    sim.write(vols[0], 10 * MiB, _data(4, G))
    sim.write(vols[1], 300 * MiB + EBS_BLOCK - 10, _data(5, 20))  # straddles two blocks
    sim.reset_stats()
    st = await sync_now(handle)
    second = cat.get_point(st.last_point_id or "")
    assert second.kind == ChangeKind.INCREMENTAL, second
    identical(second.id)
    assert _calls(sim, "GetSnapshotBlock") == 3, sim.stats()
    assert len(_transcend_snapshots(sim)) == 2  # the previous checkpoints deleted

    # Throttling and 5xx storms: botocore backs off, the copy completes, nothing lost.
    sim.write(vols[0], 20 * MiB, _data(6, 4 * MiB))
    sim.fault("throttle", 12, api="GetSnapshotBlock")
    sim.fault("503", 6, api="ListChangedBlocks")
    sim.reset_stats()
    st = await sync_now(handle)
    assert st.cycles_failed == 0, st.last_error
    third = cat.get_point(st.last_point_id or "")
    identical(third.id)
    assert _calls(sim, "GetSnapshotBlock", "injected") == 12, sim.stats()
    assert _calls(sim, "ListChangedBlocks", "injected") == 6, sim.stats()
    assert _calls(sim, "GetSnapshotBlock") == 8, sim.stats()  # 4 MiB: each block read once

    # The checkpoint snapshot of one volume deleted outside transcend: that disk is
    # compared whole and only the block that differs is written.
    ckpt = next(c for c in cat.checkpoints("web").values() if c.identity == vols[1])
    sim.client("ec2").delete_snapshot(SnapshotId=ckpt.token)
    sim.write(vols[1], 40 * MiB, _data(7, G))
    st = await sync_now(handle)
    fourth = cat.get_point(st.last_point_id or "")
    assert fourth.kind == ChangeKind.RESYNC, fourth
    identical(fourth.id)
    assert fourth.bytes_written == G, fourth.bytes_written
    assert (await verify_point(client, fourth.id)).ok

    # Unprotect: every snapshot transcend made at the source is gone.
    await handle.execute_update("remove", result_type=ReplicationStatus)
    await handle.result()
    assert _transcend_snapshots(sim) == []


def test_kvm_to_aws_snapshot_chain(stack: Stack, sim: AwsSim, tmp_path: Path) -> None:
    asyncio.run(_kvm_to_aws(stack, sim, tmp_path))


async def _kvm_to_aws(stack: Stack, sim: AwsSim, tmp_path: Path) -> None:
    cat = stack.catalog()
    kvm = KvmKit(tmp_path / "kvm")
    try:
        kvm.add_platform(cat, "kvm-src")
        _add_aws(cat, sim, "ec2", tmp_path)
        vm = kvm.make_vm("kvm-to-aws", [32 * MiB])
        kvm.write(vm, 0, 0, _data(1, 2 * MiB))
        kvm.write(vm, 0, 17 * MiB + 100, _data(2, 5000))
        client = await stack.client()
        spec = protection_spec("k2a", vm.name, "kvm-src", "ec2", retention="all 1s")
        handle = await start_protection(client, spec)
        st = await wait_first_point(handle, 300)
        assert st.cycles_failed == 0, st.last_error
        first = cat.get_point(st.last_point_id or "")
        assert sim.read_snapshot(first.disks[0].location, 32 * MiB) == bytes(vm.disks[0])

        # An incremental point: a child snapshot holding one whole EBS block. Retention
        # ("all 1s") then deletes the first point's snapshot, its parent, and the
        # second point still reads the same (EBS keeps inherited blocks).
        kvm.write(vm, 0, 4 * MiB, _data(3, G))
        await asyncio.sleep(1.5)
        st = await sync_now(handle)
        second = cat.get_point(st.last_point_id or "")
        assert second.kind == ChangeKind.INCREMENTAL
        assert second.bytes_written == EBS_BLOCK, second.bytes_written
        assert first.id not in [p.id for p in cat.points("k2a")]
        assert first.disks[0].location not in [x["id"] for x in _transcend_snapshots(sim)]
        snap2 = sim.read_snapshot(second.disks[0].location, 32 * MiB)
        assert snap2 == bytes(vm.disks[0])
        assert max(sim.snapshot_blocks(second.disks[0].location)) < 32 * MiB // EBS_BLOCK
        assert (await verify_point(client, second.id)).ok

        # Only the points' snapshots exist: no pending one, nothing stray.
        snaps = _transcend_snapshots(sim)
        assert sorted(s["id"] for s in snaps) == sorted(
            pd.location for p in cat.points("k2a") for pd in p.disks), snaps
        assert all(s["state"] == "completed" for s in snaps), snaps
        await handle.execute_update("remove", result_type=ReplicationStatus)
        await handle.result()
    finally:
        kvm.close()


def test_bad_credentials_and_unknown_instance_are_clear(sim: AwsSim, tmp_path: Path) -> None:
    info, secret = aws_platform(sim, "ec2", tmp_path)
    with pytest.raises(Exception, match="refused the credentials"):
        source_for(info, {**secret, "secret_access_key": "wrong"}).inventory()
    with pytest.raises(Exception, match="no EC2 instance 'i-0123456789abcdef0'"):
        source_for(info, secret).workload("i-0123456789abcdef0")
