"""blockstream copies between real NBD servers (qemu-nbd, nbdkit) started here.

Every copy is checked against the source file itself: block hashes computed in
Python-side reference code (hash_blocks over the file bytes), qemu-img compare,
and qemu-img map for the allocation of zero blocks.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.nbd import NbdServer, make_psk, make_x509, nbdkit, qemu_nbd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockstream import (
    BlockstreamError,
    Cancelled,
    Extent,
    Progress,
    Stream,
    block_status,
    copy,
    hash_blocks,
    plan_extents,
    zero_manifest,
)
from blockstream import _blockstream as _c

pytestmark = pytest.mark.timeout(120)

KiB = 1024
MiB = 1024 * KiB
BS = 65536
DISK = 24 * MiB + 20992  # a multiple of 512, not of the block size
NBLOCKS = -(-DISK // BS)


# ---- fixtures and helpers -----------------------------------------------------


def build_source(path: Path, seed: int = 1) -> bytes:
    """Random data, written zeros, unallocated holes, unaligned bits, a zero
    block inside data and a partial last block.  Returns the file content."""
    rnd = random.Random(seed)
    content = bytearray(DISK)

    def data(off: int, n: int) -> None:
        content[off : off + n] = rnd.randbytes(n)

    data(0, MiB)
    # [1M, 2M) written as zeros below, [2M, 3M) stays a hole
    data(3 * MiB + 1000, 5000)
    data(4 * MiB, 8 * MiB)
    content[6 * MiB : 6 * MiB + BS] = bytes(BS)  # zero block in data
    content[7 * MiB + 100 : 7 * MiB + 3100] = bytes(3000)  # zero run, not a block
    # [12M, 20M) hole
    data(20 * MiB, DISK - 20 * MiB)
    with open(path, "wb") as f:
        f.truncate(DISK)
        for off, n in [(0, 2 * MiB), (3 * MiB, BS), (4 * MiB, 8 * MiB), (20 * MiB, DISK - 20 * MiB)]:
            os.pwrite(f.fileno(), bytes(content[off : off + n]), off)
    return bytes(content)


@pytest.fixture(scope="module")
def src_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("bs-src") / "src.raw"
    return path, build_source(path)


@pytest.fixture(scope="module")
def src(src_image: tuple[Path, bytes]) -> Iterator[NbdServer]:
    with qemu_nbd(src_image[0], fmt="raw", read_only=True) as srv:
        yield srv


@pytest.fixture
def dst_qcow2(tmp_path: Path) -> Path:
    path = tmp_path / "dst.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(DISK)], check=True)
    return path


def read_image(path: Path, fmt: str = "qcow2") -> bytes:
    out = path.with_suffix(".readback")
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out)], check=True)
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_img_identical(raw: Path, qcow2: Path) -> bool:
    r = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(qcow2)],
        capture_output=True,
        text=True,
    )
    return r.returncode == 0


def data_blocks(qcow2: Path) -> set[int]:
    """Blocks of the image that hold data clusters (qemu-img map)."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", str(qcow2)], check=True, capture_output=True, text=True
    ).stdout
    blocks: set[int] = set()
    for e in json.loads(out):
        if e["data"]:
            blocks.update(range(e["start"] // BS, -(-(e["start"] + e["length"]) // BS)))
    return blocks


def nonzero_blocks(content: bytes) -> set[int]:
    return {b for b in range(NBLOCKS) if any(content[b * BS : (b + 1) * BS])}


def expected_after(content: bytes, extents: list[Extent], start: int = 0) -> bytes:
    """The destination (initially zero) after copying ``extents``: every
    touched block (widened) holds the source bytes."""
    out = bytearray(DISK)
    for s, e, _z in _c.normalize([(x.offset, x.length, x.zero) for x in extents], DISK, BS, start):
        out[s:e] = content[s:e]
    return bytes(out)


def run_in_thread(stream: Stream) -> tuple[threading.Thread, dict[str, object]]:
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["progress"] = stream.run()
        except BaseException as e:
            result["error"] = e
        result["t_end"] = time.monotonic()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, result


def wait_for(cond: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached")


# ---- full copies ----------------------------------------------------------------


@pytest.mark.parametrize(
    "opts",
    [
        {"connections": 1, "hash": "xxh128"},
        {
            "connections": 4,
            "hash": "blake2b",
            "max_request": 256 * KiB,
            "in_flight": 4,
            "flush_interval": 2 * MiB,
        },
        {"connections": 2, "block_size": 4096, "max_request": 12 * KiB, "in_flight": 3},
    ],
    ids=["1conn-xxh128", "4conn-blake2b", "2conn-4k-blocks"],
)
def test_full_copy_is_identical(
    src: NbdServer, src_image: tuple[Path, bytes], dst_qcow2: Path, opts: dict[str, object]
) -> None:
    path, content = src_image
    bs = int(opts.get("block_size", BS))  # type: ignore[call-overload]
    alg = str(opts.get("hash", "xxh128"))
    extents = plan_extents(block_status(src.uri), None, disk_size=DISK, granularity=bs)
    assert extents and all(not e.zero for e in extents)
    manifest = zero_manifest(DISK, bs, alg)
    with qemu_nbd(dst_qcow2, fmt="qcow2") as dst:
        p = copy(src.uri, dst.uri, extents, disk_size=DISK, manifest=manifest, **opts)
    assert p.done
    assert p.durable_offset == extents[-1].end == DISK
    assert p.extents_done == p.extents_total
    assert p.bytes_written + p.bytes_zero == p.bytes_total == sum(e.length for e in extents)
    assert p.bytes_read == p.bytes_total and p.bytes_skipped == 0
    assert bytes(manifest) == hash_blocks(content, bs, alg)
    assert read_image(dst_qcow2) == content
    assert qemu_img_identical(path, dst_qcow2)


def test_zero_blocks_are_not_data_clusters(
    src: NbdServer, src_image: tuple[Path, bytes], dst_qcow2: Path
) -> None:
    """Every extent is given as data (so zero runs are read and detected) plus
    one explicit zero extent: only non-zero blocks may become data clusters."""
    _, content = src_image
    extents = [Extent(0, 12 * MiB), Extent(12 * MiB, 8 * MiB, zero=True), Extent(20 * MiB, DISK - 20 * MiB)]
    manifest = zero_manifest(DISK)
    with qemu_nbd(dst_qcow2, fmt="qcow2") as dst:
        p = copy(src.uri, dst.uri, extents, disk_size=DISK, manifest=manifest)
    zero_blocks = NBLOCKS - len(nonzero_blocks(content))  # all full blocks
    assert p.bytes_zero == zero_blocks * BS
    assert p.bytes_read == DISK - 8 * MiB  # the zero extent is not read
    assert data_blocks(dst_qcow2) == nonzero_blocks(content)
    assert read_image(dst_qcow2) == content
    assert bytes(manifest) == hash_blocks(content, BS)


def test_unaligned_and_overlapping_extents(
    src: NbdServer, src_image: tuple[Path, bytes], dst_qcow2: Path
) -> None:
    path, content = src_image
    extents = [
        Extent(100, 300_000),
        Extent(MiB + 10, MiB - 20, zero=True),  # edges are partial: read as data
        Extent(3 * MiB + 1000, 5000),
        Extent(6 * MiB, BS, zero=True),
        Extent(5 * MiB, 2 * MiB),  # overlaps the zero extent: data wins
        Extent(DISK - 5000, 5000),  # the partial last block
        Extent(100, 300_000),  # duplicate
        Extent(9 * MiB + 1, 0),  # empty
    ]
    manifest = zero_manifest(DISK)
    before = bytes(manifest)
    with qemu_nbd(dst_qcow2, fmt="qcow2") as dst:
        p = copy(
            src.uri, dst.uri, extents, disk_size=DISK, manifest=manifest, connections=3, max_request=128 * KiB
        )
    expected = expected_after(content, extents)
    got = read_image(dst_qcow2)
    assert got == expected
    segs = _c.normalize([(e.offset, e.length, e.zero) for e in extents], DISK, BS)
    touched = {b for s, e, _ in segs for b in range(s // BS, -(-e // BS))}
    src_hashes = hash_blocks(content, BS)
    for b in range(NBLOCKS):
        entry = manifest[b * 16 : (b + 1) * 16]
        want = src_hashes[b * 16 : (b + 1) * 16] if b in touched else before[b * 16 : (b + 1) * 16]
        assert entry == want, b
    assert p.durable_offset == DISK  # the last extent ends the disk
    assert p.bytes_total == sum(e - s for s, e, _ in segs)
    assert not qemu_img_identical(path, dst_qcow2)  # only part of it was copied


def test_hash_only(src: NbdServer, src_image: tuple[Path, bytes]) -> None:
    _, content = src_image
    manifest = bytearray(b"\xff" * len(zero_manifest(DISK)))
    p = copy(src.uri, None, [Extent(0, DISK)], disk_size=DISK, manifest=manifest, connections=2)
    assert bytes(manifest) == hash_blocks(content, BS)
    assert p.bytes_written == 0 and p.bytes_read == DISK and p.durable_offset == DISK
    assert (NBLOCKS - 1) in nonzero_blocks(content)
    assert p.bytes_zero == (NBLOCKS - len(nonzero_blocks(content))) * BS


def test_nbdkit_endpoints_and_server_block_limits() -> None:
    """nbdkit pattern -> nbdkit memory (blocksize filter caps requests at
    64 KiB, so 4 MiB requests are split)."""
    size = 8 * MiB
    pattern = b"".join(i.to_bytes(8, "big") for i in range(0, size, 8))
    with (
        nbdkit("pattern", f"size={size}") as s,
        nbdkit("memory", f"size={size}", "maxdata=64K", filters=["blocksize"]) as d,
    ):
        m = zero_manifest(size)
        copy(s.uri, d.uri, [Extent(0, size)], disk_size=size, manifest=m)
        assert bytes(m) == hash_blocks(pattern, BS)
        check = zero_manifest(size)
        copy(d.uri, None, [Extent(0, size)], disk_size=size, manifest=check)
        assert check == m


# ---- compare mode -----------------------------------------------------------------


def test_compare_mode_writes_only_differing_blocks(tmp_path: Path, src_image: tuple[Path, bytes]) -> None:
    """Destination behind nbdkit's log filter: the NBD writes it received are
    exactly the changed blocks."""
    src_path = tmp_path / "src.raw"
    shutil.copy(src_image[0], src_path)
    dst_path = tmp_path / "dst.raw"
    with open(dst_path, "wb") as f:
        f.truncate(DISK)
    log = tmp_path / "nbd.log"
    manifest = zero_manifest(DISK)
    with (
        qemu_nbd(src_path, fmt="raw", read_only=True) as s,
        nbdkit("file", str(dst_path), f"logfile={log}", filters=["log"]) as d,
    ):
        everything = [Extent(0, DISK)]
        copy(s.uri, d.uri, everything, disk_size=DISK, manifest=manifest)
        assert dst_path.read_bytes() == src_path.read_bytes()

        content = bytearray(src_path.read_bytes())
        rnd = random.Random(7)
        assert any(content[150 * BS : 151 * BS])
        changed = {5: rnd.randbytes(BS), 100: rnd.randbytes(BS)}
        changed[3] = bytes(content[3 * BS : 4 * BS])  # rewritten, same bytes
        content[9 * BS + 17] ^= 1  # one bit in block 9
        changed[9] = bytes(content[9 * BS : 10 * BS])
        changed[150] = bytes(BS)  # data -> zeros
        changed[NBLOCKS - 1] = rnd.randbytes(DISK % BS)  # partial last block
        with open(src_path, "r+b") as f:
            for b, data in changed.items():
                os.pwrite(f.fileno(), data, b * BS)
                content[b * BS : b * BS + len(data)] = data
        log.write_text("")

        p = copy(s.uri, d.uri, everything, disk_size=DISK, manifest=manifest, compare=True, connections=2)
    written: set[int] = set()
    zeroed: set[int] = set()
    for line in log.read_text().splitlines():
        m = re.search(r" (Write|Zero|Trim) id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)", line)
        if m:
            off, cnt = int(m.group(2), 16), int(m.group(3), 16)
            blocks = set(range(off // BS, -(-(off + cnt) // BS)))
            (written if m.group(1) == "Write" else zeroed).update(blocks)
    assert written == {5, 9, 100, NBLOCKS - 1}
    assert zeroed == {150}
    assert p.bytes_written == 3 * BS + DISK % BS
    assert p.bytes_zero == BS
    assert p.bytes_skipped == DISK - p.bytes_written - p.bytes_zero
    assert dst_path.read_bytes() == bytes(content)
    assert bytes(manifest) == hash_blocks(bytes(content), BS)


# ---- cancel and resume ---------------------------------------------------------------


@pytest.mark.parametrize("compare", [False, True], ids=["copy", "compare"])
def test_cancel_then_resume_is_identical(
    src: NbdServer, src_image: tuple[Path, bytes], dst_qcow2: Path, compare: bool
) -> None:
    path, content = src_image
    initial = zero_manifest(DISK)
    manifest = bytearray(initial)
    everything = [Extent(0, DISK)]
    opts = {
        "disk_size": DISK,
        "manifest": manifest,
        "compare": compare,
        "connections": 2,
        "in_flight": 2,
        "max_request": 256 * KiB,
        "flush_interval": MiB,
    }
    with qemu_nbd(dst_qcow2, fmt="qcow2") as dst:
        s = Stream(src.uri, dst.uri, everything, rate_limit=8 * MiB, **opts)  # type: ignore[arg-type]
        t, res = run_in_thread(s)
        wait_for(lambda: s.progress().durable_offset >= 4 * MiB)
        s.cancel()
        t.join(10)
        assert not t.is_alive()
        assert isinstance(res.get("error"), Cancelled)
        p = s.progress()
        d = p.durable_offset
        assert not p.done
        assert d % BS == 0 and 4 * MiB <= d < DISK
        # the manifest describes the destination below d and nothing above it
        k = d // BS * 16
        src_hashes = hash_blocks(content, BS)
        assert manifest[:k] == src_hashes[:k]
        assert manifest[k:] == initial[k:]
        # the destination really holds the source below d
        dst_hashes = zero_manifest(DISK)
        copy(dst.uri, None, [Extent(0, d)], disk_size=DISK, manifest=dst_hashes)
        assert dst_hashes[:k] == src_hashes[:k]
        # resume from the durable offset with the same manifest buffer
        p2 = Stream(src.uri, dst.uri, everything, start_offset=d, **opts).run()  # type: ignore[arg-type]
        assert p2.done and p2.durable_offset == DISK
        assert p2.bytes_total == DISK - d
    assert bytes(manifest) == src_hashes
    assert read_image(dst_qcow2) == content
    assert qemu_img_identical(path, dst_qcow2)


def test_flush_seconds_advance_the_durable_offset_on_a_slow_copy(
    src: NbdServer, src_image: tuple[Path, bytes], dst_qcow2: Path
) -> None:
    """A slow link never writes flush_interval bytes between rounds; flush_seconds
    still makes progress durable (what a failed attempt does not send again)."""
    _, content = src_image
    durable_mid: dict[float, int] = {}
    for seconds in (0.0, 0.3):
        manifest = bytearray(zero_manifest(DISK))
        with qemu_nbd(dst_qcow2, fmt="qcow2") as dst:
            s = Stream(src.uri, dst.uri, [Extent(0, DISK)], disk_size=DISK, manifest=manifest,
                       rate_limit=8 * MiB, connections=2, in_flight=2, max_request=256 * KiB,
                       flush_interval=256 * MiB, flush_seconds=seconds)
            t, res = run_in_thread(s)
            wait_for(lambda: s.progress().bytes_written >= 12 * MiB)  # noqa: B023
            durable_mid[seconds] = s.progress().durable_offset
            mid = s.progress()
            t.join(20)
            assert "error" not in res, res
            end = s.progress()
            assert end.durable_offset == DISK
            # what a failure would have had to move again: nothing once all is durable
            assert (end.read_durable, end.written_durable) == (end.bytes_read, end.bytes_written)
            assert mid.read_durable <= mid.bytes_read and mid.written_durable <= mid.bytes_written
            if seconds:
                assert 0 < mid.written_durable < end.bytes_written
        # durable means flushed and hashed: the manifest below it is the source's
        assert bytes(manifest) == hash_blocks(content, BS)
    assert durable_mid[0.0] == 0  # 256 MiB never reached: nothing durable mid-copy
    # about 8 MiB/s * 0.3 s per round: durable trails the copy by a few MiB at most
    assert durable_mid[0.3] >= 6 * MiB, durable_mid


def test_rate_limit_and_change_while_running(src: NbdServer, dst_qcow2: Path) -> None:
    """The limit holds (never more read than the bucket allows for the time that
    passed, however slow the machine) and lifting it takes effect while running:
    8 MiB at 128 KiB/s would take 64 s."""
    rate = 128 * KiB
    with qemu_nbd(dst_qcow2, fmt="qcow2") as dst:
        s = Stream(
            src.uri,
            dst.uri,
            [Extent(4 * MiB, 8 * MiB)],
            disk_size=DISK,
            rate_limit=rate,
            connections=1,
            in_flight=4,
            max_request=64 * KiB,
        )
        t0 = time.monotonic()
        t, res = run_in_thread(s)
        time.sleep(1.0)
        p = s.progress()
        elapsed = time.monotonic() - t0
        # the bucket: the rate for the time that passed, plus the 0.25 s burst
        # and one request it may overdraw by
        assert p.bytes_read <= rate * elapsed + rate / 4 + 64 * KiB, (p, elapsed)
        assert not p.done
        s.set_rate_limit(None)
        t.join(30)
        assert not t.is_alive(), "lifting the rate limit did not take effect"
        assert "error" not in res, res
        final = res["progress"]
        assert isinstance(final, Progress) and final.done and final.bytes_read == 8 * MiB


def test_gil_is_released_during_run(src: NbdServer, dst_qcow2: Path) -> None:
    """A Python thread runs while run() is inside the engine: it sees the copy's
    progress strictly between start and end (with the GIL held it could only
    run before or after)."""
    total = 12 * MiB
    seen_mid = 0
    stop = threading.Event()
    with qemu_nbd(dst_qcow2, fmt="qcow2") as dst:
        s = Stream(src.uri, dst.uri, [Extent(0, total)], disk_size=DISK, rate_limit=12 * MiB,
                   connections=1, max_request=256 * KiB)

        def watch() -> None:
            nonlocal seen_mid
            while not stop.is_set():
                if 0 < s.progress().bytes_read < total:
                    seen_mid += 1

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            p = s.run()
        finally:
            stop.set()
            watcher.join()
    assert p.done and p.bytes_read == total
    assert seen_mid > 0


# ---- failures ------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["source", "destination"])
def test_server_killed_mid_copy_raises_with_extent(
    src_image: tuple[Path, bytes], dst_qcow2: Path, victim: str
) -> None:
    with qemu_nbd(src_image[0], fmt="raw", read_only=True) as s, qemu_nbd(dst_qcow2, fmt="qcow2") as d:
        stream = Stream(
            s.uri,
            d.uri,
            [Extent(0, DISK)],
            disk_size=DISK,
            manifest=zero_manifest(DISK),
            rate_limit=6 * MiB,
            connections=2,
            max_request=256 * KiB,
        )
        t, res = run_in_thread(stream)
        wait_for(lambda: stream.progress().bytes_written > MiB)
        t_kill = time.monotonic()
        (s if victim == "source" else d).kill()
        t.join(15)
        assert not t.is_alive(), "run() hangs after the server died"
    err = res.get("error")
    assert isinstance(err, BlockstreamError) and not isinstance(err, Cancelled), res
    assert float(res["t_end"]) - t_kill < 5  # type: ignore[arg-type]
    assert err.endpoint == victim
    assert err.extent is not None
    off, length = err.extent
    assert 0 <= off < DISK and 0 < length <= DISK - off
    assert err.errno != 0 and err.nbd_error
    assert f"offset={off}" in str(err) and victim in str(err)
    p = stream.progress()
    assert not p.done and p.durable_offset <= off + length


def test_destination_too_small_and_read_only(src: NbdServer, tmp_path: Path) -> None:
    small = tmp_path / "small.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(small), str(DISK - BS)], check=True)
    with qemu_nbd(small, fmt="qcow2") as d:
        with pytest.raises(BlockstreamError, match="smaller than disk_size") as ei:
            copy(src.uri, d.uri, [Extent(0, BS)], disk_size=DISK)
        assert ei.value.endpoint == "destination"
    with qemu_nbd(small, fmt="qcow2", read_only=True) as d:
        with pytest.raises(BlockstreamError, match="read-only") as ei:
            copy(src.uri, d.uri, [Extent(0, BS)], disk_size=DISK - BS)
        assert ei.value.endpoint == "destination"


# ---- TLS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    base = tmp_path_factory.mktemp("tls")
    return make_x509(base / "good"), make_x509(base / "other", ca_name="some other CA")


def test_tls_x509_copy_and_wrong_ca_refused(
    src_image: tuple[Path, bytes], dst_qcow2: Path, certs: tuple[object, object]
) -> None:
    path, content = src_image
    good, other = certs
    with (
        qemu_nbd(path, fmt="raw", read_only=True, tcp=True, tls=good) as s,
        qemu_nbd(dst_qcow2, fmt="qcow2", tcp=True, tls=good) as d,
    ):  # type: ignore[arg-type]
        assert s.uri.startswith("nbds://localhost:")
        m = zero_manifest(DISK)
        extents = plan_extents(block_status(s.uri), None, disk_size=DISK, granularity=BS)
        p = copy(s.uri, d.uri, extents, disk_size=DISK, manifest=m)
        assert p.done and bytes(m) == hash_blocks(content, BS)
        for uri, side in [(s.uri_with(other), "source"), (d.uri_with(other), "destination")]:  # type: ignore[arg-type]
            good_uri = d.uri if side == "source" else s.uri
            args = (uri, good_uri) if side == "source" else (good_uri, uri)
            with pytest.raises(BlockstreamError) as ei:
                copy(*args, [Extent(0, BS)], disk_size=DISK)
            assert ei.value.endpoint == side
            assert "certificate" in ei.value.nbd_error.lower()
        with pytest.raises(BlockstreamError, match="TLS"):
            copy(s.uri_with(None), None, [Extent(0, BS)], disk_size=DISK)
    assert qemu_img_identical(path, dst_qcow2)


def test_tls_psk_nbdkit(tmp_path: Path, src: NbdServer, src_image: tuple[Path, bytes]) -> None:
    _, content = src_image
    psk = make_psk(tmp_path / "psk")
    with nbdkit("memory", f"size={DISK}", tcp=True, tls=psk) as d:
        assert d.uri.startswith(f"nbds://{psk.username}@localhost:")
        # the user only as tls-username= (libnbd 1.14 alone would use the login name)
        query_only = d.uri.replace(f"{psk.username}@", "")
        assert f"tls-username={psk.username}" in query_only
        m = zero_manifest(DISK)
        copy(src.uri, query_only, [Extent(0, 4 * MiB)], disk_size=DISK, manifest=m)
        back = zero_manifest(DISK)
        copy(d.uri, None, [Extent(0, 4 * MiB)], disk_size=DISK, manifest=back)
        wrong = make_psk(tmp_path / "wrong", username=psk.username)
        with pytest.raises(BlockstreamError) as ei:
            copy(d.uri_with(wrong), None, [Extent(0, BS)], disk_size=DISK)
        assert ei.value.endpoint == "source"
        k = 4 * MiB // BS * 16
        assert back[:k] == hash_blocks(content[: 4 * MiB], BS) == m[:k]


# ---- fuzzing against real servers ----------------------------------------------------------

FUZZ_DISK = MiB + 1536


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, bytes, str, Path]]:
    base = tmp_path_factory.mktemp("fuzz")
    rnd = random.Random(3)
    content = bytearray(FUZZ_DISK)
    for b in range(0, FUZZ_DISK, 4096):
        kind = rnd.random()
        if kind < 0.5:
            content[b : b + 4096] = rnd.randbytes(min(4096, FUZZ_DISK - b))
        elif kind < 0.6:
            content[b + 100 : b + 200] = rnd.randbytes(100)
    src_path = base / "src.raw"
    src_path.write_bytes(bytes(content))
    dst_path = base / "dst.raw"
    dst_path.write_bytes(bytes(FUZZ_DISK))
    with qemu_nbd(src_path, fmt="raw", read_only=True) as s, qemu_nbd(dst_path, fmt="raw") as d:
        yield s.uri, bytes(content), d.uri, dst_path


def zero_runs(content: bytes) -> list[tuple[int, int]]:
    runs = []
    for b in range(0, len(content), 4096):
        if not any(content[b : b + 4096]):
            runs.append((b, min(4096, len(content) - b)))
    return runs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_copies_against_block_model(fuzz_env: tuple[str, bytes, str, Path], data: st.DataObject) -> None:
    src_uri, content, dst_uri, dst_path = fuzz_env
    runs = zero_runs(content)
    n = data.draw(st.integers(0, 8))
    extents = []
    for _ in range(n):
        if runs and data.draw(st.booleans()):
            off, length = data.draw(st.sampled_from(runs))
            a = data.draw(st.integers(0, length - 1))
            extents.append(Extent(off + a, data.draw(st.integers(1, length - a)), zero=True))
        else:
            off = data.draw(st.integers(0, FUZZ_DISK - 1))
            extents.append(Extent(off, data.draw(st.integers(0, FUZZ_DISK - off))))
    bs = data.draw(st.sampled_from([4096, 8192, 16384]))
    alg = data.draw(st.sampled_from(["xxh128", "blake2b"]))
    opts = {
        "block_size": bs,
        "hash": alg,
        "connections": data.draw(st.integers(1, 3)),
        "in_flight": data.draw(st.integers(1, 4)),
        "max_request": data.draw(st.sampled_from([4096, 12288, 65536, 4 * MiB])),
        "flush_interval": data.draw(st.sampled_from([1, 8192, 256 * MiB])),
        "allow_trim": data.draw(st.booleans()),
    }
    with open(dst_path, "r+b") as f:
        os.pwrite(f.fileno(), bytes(FUZZ_DISK), 0)
    manifest = zero_manifest(FUZZ_DISK, bs, alg)
    initial = bytes(manifest)
    p = copy(src_uri, dst_uri, extents, disk_size=FUZZ_DISK, manifest=manifest, **opts)
    segs = _c.normalize([(e.offset, e.length, e.zero) for e in extents], FUZZ_DISK, bs)
    expected = bytearray(FUZZ_DISK)
    want_manifest = bytearray(initial)
    src_hashes = hash_blocks(content, bs, alg)
    for s, e, _z in segs:
        expected[s:e] = content[s:e]
        want_manifest[s // bs * 16 : -(-e // bs) * 16] = src_hashes[s // bs * 16 : -(-e // bs) * 16]
    assert dst_path.read_bytes() == bytes(expected)
    assert manifest == want_manifest
    assert p.done and p.extents_done == p.extents_total == len(segs)
    assert p.bytes_written + p.bytes_zero == p.bytes_total == sum(e - s for s, e, _ in segs)
    assert p.durable_offset == (segs[-1][1] if segs else 0)
