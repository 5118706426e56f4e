"""Verify costs what the point holds, not what its disk could hold (issue #16): a 256 MiB
disk with 1 MiB of data is verified by reading about 1 MiB, and skipping what reads as
zeros hides nothing: bytes written into a hole of the point are found."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError

import blockstream
from activities.cycle import _unpacked
from activities.points import mismatched_blocks
from tests.harness import synthetic
from tests.harness.protect import protection_spec, start_protection, verify_point, wait_first_point
from tests.harness.stack import transcend_stack
from transcend.models import PlatformKind, PlatformSpec

MiB = 1 << 20


def test_staged_manifests_travel_packed() -> None:
    """What the stream stages for verify and commit: a 1 TiB disk's 256 MiB array is
    packed to KiBs; a raw array staged by an older worker is still read."""
    size = 1 << 40
    raw = bytes(blockstream.zero_manifest(size))
    packed = blockstream.pack_manifest(raw, disk_size=size)
    assert len(raw) == 256 * MiB and len(packed) < 64 * 1024, len(packed)
    assert _unpacked(packed) == raw
    small = bytes(blockstream.zero_manifest(4 * MiB))
    assert _unpacked(small) == small


def test_mismatched_blocks_finds_each_difference() -> None:
    a = bytearray(16 * 10_000)
    assert mismatched_blocks(a, bytes(a)) == []
    b = bytearray(a)
    for block in (0, 4095, 4096, 9999):
        b[block * 16] = 1
    assert mismatched_blocks(a, b) == [0, 4095, 4096, 9999]
    assert mismatched_blocks(a, b, limit=2) == [0, 4095]


def test_verify_reads_what_the_point_holds(tmp_path: Path) -> None:
    with synthetic.synthetic_servers(tmp_path / "data") as srv, \
            transcend_stack(tmp_path / "home", workers=0) as stack:
        stack.env["TRANSCEND_PLUGINS"] = "tests.harness.synthetic"
        stack.start_worker()
        cat = stack.catalog()
        cat.add_platform(PlatformSpec(name="v-src", kind=PlatformKind.SYNTHETIC,
                                      config=srv.source_config(disk_mib=256, data_kib=1024)))
        cat.add_platform(PlatformSpec(name="v-dst", kind=PlatformKind.SYNTHETIC,
                                      config=srv.target_config()))

        async def run() -> None:
            client = await stack.client()
            handle = await start_protection(client, protection_spec("vc", "vm-v", "v-src", "v-dst"))
            st = await wait_first_point(handle, timeout=120)
            assert st.cycles_failed == 0, (st.last_error, stack.worker_log_tail())
            point = cat.latest_point("vc")
            assert point is not None
            result = await verify_point(client, point.id)
            assert result.ok and result.disks["vda"] == 256 * MiB // 65536, result
            # 1 MiB of data and the generation's blocks, not the 256 MiB of the disk
            assert 0 < result.bytes_read["vda"] <= 2 * MiB, result.bytes_read
            # bytes in what was a hole: block status now says data there, and it differs
            with open(point.disks[0].location, "r+b") as f:
                f.seek(128 * MiB)
                f.write(os.urandom(4096))
            with pytest.raises(WorkflowFailureError) as failed:
                await verify_point(client, point.id)
            assert f"does not match its manifest: {{'vda': [{128 * MiB // 65536}]}}" in \
                str(failed.value.cause), failed.value.cause
            await handle.execute_update("remove")
            await handle.result()

        asyncio.run(run())
