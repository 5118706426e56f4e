"""The manifest's block size follows the target (issue #15): a target that writes in
512 KiB units (EBS direct's block) gets 512 KiB manifest blocks; when its unit grows
between points, the next cycle hashes the replica once in the new size and every point
still verifies."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import blockstream
from tests.harness import synthetic
from tests.harness.protect import (
    protection_spec,
    start_protection,
    sync_now,
    verify_point,
    wait_first_point,
)
from tests.harness.stack import transcend_stack
from transcend.catalog import Catalog
from transcend.models import PlatformKind, PlatformSpec, manifest_block_size

KIB = 1024


def test_the_rule() -> None:
    assert manifest_block_size(512) == 64 * KIB  # the default where the target allows it
    assert manifest_block_size(512 * KIB) == 512 * KIB  # never finer than what it writes
    assert manifest_block_size(512, previous=64 * KIB) == 64 * KIB
    assert manifest_block_size(512, previous=1024 * KIB) == 1024 * KIB  # a coarser one carries
    assert manifest_block_size(512 * KIB, previous=64 * KIB) == 512 * KIB  # 64 KiB no longer fits
    assert manifest_block_size(1024 * KIB, previous=512 * KIB) == 1024 * KIB


def _check_point(cat: Catalog, protection: str, src_cfg: dict[str, object], block: int) -> str:
    """The newest point: its block size, its manifest (hashes of the expected image in
    that block size) and its bytes."""
    point = cat.latest_point(protection)
    assert point is not None
    d = point.disks[0]
    assert d.block_size == block, (d.block_size, block)
    gen = int(cat.checkpoints(protection)["vda"].token.removeprefix("gen-"))
    want = synthetic.expected_image("vm-g", gen, src_cfg)
    manifest, header = blockstream.unpack_manifest(cat.manifest(point.id, "vda"))
    assert header["block_size"] == block
    assert bytes(manifest) == bytes(blockstream.hash_blocks(want, block))
    assert hashlib.sha256(Path(d.location).read_bytes()).digest() == hashlib.sha256(want).digest()
    return point.id


def test_manifest_block_size_follows_the_target(tmp_path: Path) -> None:
    with synthetic.synthetic_servers(tmp_path / "data") as srv, \
            transcend_stack(tmp_path / "home", workers=0) as stack:
        stack.env["TRANSCEND_PLUGINS"] = "tests.harness.synthetic"
        stack.start_worker()
        cat = stack.catalog()
        src_cfg = srv.source_config(disk_mib=4, data_kib=2048, blocks_per_cycle=3)
        cat.add_platform(PlatformSpec(name="g-src", kind=PlatformKind.SYNTHETIC, config=src_cfg))

        def target(granularity: int) -> None:
            cat.add_platform(PlatformSpec(
                name="g-dst", kind=PlatformKind.SYNTHETIC,
                config={**srv.target_config(), "write_granularity": granularity}), replace=True)

        target(512 * KIB)

        async def run() -> None:
            client = await stack.client()
            handle = await start_protection(client, protection_spec("gran", "vm-g", "g-src", "g-dst"))
            st = await wait_first_point(handle, timeout=120)
            assert st.cycles_failed == 0, (st.last_error, stack.worker_log_tail())
            first = _check_point(cat, "gran", src_cfg, 512 * KIB)
            assert (await verify_point(client, first)).ok
            # incremental at the same granularity: the manifest carries forward
            st = await sync_now(handle, timeout=120)
            assert st.cycles_failed == 0, (st.last_error, stack.worker_log_tail())
            second = _check_point(cat, "gran", src_cfg, 512 * KIB)
            assert (await verify_point(client, second)).ok
            # the target's unit grows: 512 KiB hashes cannot be joined; the next cycle
            # hashes the replica in 1 MiB blocks, and still copies only what changed
            target(1024 * KIB)
            st = await sync_now(handle, timeout=120)
            assert st.cycles_failed == 0, (st.last_error, stack.worker_log_tail())
            third = _check_point(cat, "gran", src_cfg, 1024 * KIB)
            assert (await verify_point(client, third)).ok
            assert (await verify_point(client, first)).ok  # older points keep their size
            point = cat.latest_point("gran")
            assert point is not None and point.bytes_written <= 3 * 1024 * KIB, point.bytes_written
            await handle.execute_update("remove")
            await handle.result()

        asyncio.run(run())
