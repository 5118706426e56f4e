"""blockstream API without servers: hashing, manifests, extent planning and
normalisation against per-block reference models, option validation fuzzing."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import itertools
import os
import pickle
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blockstream
from blockstream import (
    HASH_SIZE,
    BlockstreamError,
    Cancelled,
    Extent,
    ManifestError,
    Stream,
    hash_blocks,
    manifest_size,
    pack_manifest,
    plan_extents,
    unpack_manifest,
    zero_manifest,
)
from blockstream import _blockstream as _c

KiB = 1024
MiB = 1024 * KiB


# ---- hashing -----------------------------------------------------------------


def test_xxh128_known_vector() -> None:
    # XXH3_128bits("abc"), canonical (big-endian) form, as printed by xxhsum -H2
    assert hash_blocks(b"abc", 4096).hex() == "06b05ab6733a618578af5f94892f3950"


def test_blake2b_is_truncated_blake2b_512() -> None:
    data = os.urandom(10000)
    got = hash_blocks(data, 4096, "blake2b")
    want = b"".join(hashlib.blake2b(data[i : i + 4096]).digest()[:16] for i in range(0, len(data), 4096))
    assert got == want


@pytest.mark.parametrize("alg", ["xxh128", "blake2b"])
def test_hash_blocks_partial_last_block(alg: str) -> None:
    data = os.urandom(3 * 4096 + 100)
    h = hash_blocks(data, 4096, alg)
    assert len(h) == 4 * HASH_SIZE
    assert h[3 * 16 :] == hash_blocks(data[3 * 4096 :], 4096, alg)
    assert h[:16] == hash_blocks(data[:4096], 4096, alg)
    assert h[:16] != h[16:32]
    assert hash_blocks(b"", 4096, alg) == b""


def test_manifest_size_and_zero_manifest() -> None:
    assert manifest_size(0) == 0
    assert manifest_size(1) == 16
    assert manifest_size(65536) == 16
    assert manifest_size(65537) == 32
    assert manifest_size(10 * MiB, 4096) == 2560 * 16
    for alg in ("xxh128", "blake2b"):
        size = 3 * 65536 + 4608
        m = zero_manifest(size, 65536, alg)
        assert isinstance(m, bytearray)
        assert bytes(m) == hash_blocks(bytes(size), 65536, alg)
        assert m[:16] != m[-16:]  # partial last block hashes differently
    with pytest.raises(ValueError):
        zero_manifest(100, 65536, "none")
    with pytest.raises(ValueError):
        manifest_size(100, 3000)
    with pytest.raises(TypeError):
        manifest_size("100")  # type: ignore[arg-type]


# ---- manifest packing ------------------------------------------------------------


def test_pack_unpack_roundtrip() -> None:
    size = 5 * MiB + 512
    m = bytearray(os.urandom(manifest_size(size, 65536)))
    m[16:64] = bytes(48)
    packed = pack_manifest(m, block_size=65536, disk_size=size, hash="blake2b")
    out, info = unpack_manifest(packed)
    assert out == m and isinstance(out, bytearray)
    assert info == {
        "version": 1,
        "hash": "blake2b",
        "block_size": 65536,
        "disk_size": size,
        "entries": len(m) // 16,
    }
    zm = zero_manifest(64 * MiB)
    assert len(pack_manifest(zm)) < 200  # compresses
    assert unpack_manifest(pack_manifest(zm))[1]["disk_size"] == 64 * MiB


def test_unpack_detects_corruption() -> None:
    m = bytearray(os.urandom(manifest_size(MiB, 65536)))
    packed = pack_manifest(m, disk_size=MiB)
    for i in [0, 5, 10, 20, 30, 45, 60, len(packed) // 2, len(packed) - 1]:
        bad = bytearray(packed)
        bad[i] ^= 0x40
        with pytest.raises(ManifestError):
            unpack_manifest(bytes(bad))
    with pytest.raises(ManifestError):
        unpack_manifest(packed[:-3])
    with pytest.raises(ManifestError):
        unpack_manifest(packed + b"x")
    with pytest.raises(ManifestError):
        unpack_manifest(b"")
    with pytest.raises(ValueError):
        pack_manifest(b"x" * 17)
    with pytest.raises(ValueError):
        pack_manifest(m, disk_size=3 * MiB)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_unpack_garbage_never_crashes(data: bytes) -> None:
    with pytest.raises(ManifestError):
        unpack_manifest(data)


# ---- exceptions --------------------------------------------------------------------


def test_error_attributes_and_pickle() -> None:
    e = Cancelled("x", extent=(1, 2), nbd_error="boom", errno=5, endpoint="source")
    assert isinstance(e, BlockstreamError)
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is Cancelled
    assert (e2.extent, e2.nbd_error, e2.errno, e2.endpoint, str(e2)) == ((1, 2), "boom", 5, "source", "x")


# ---- extent normalisation (C) against a per-block model --------------------------


def _covered(lo: int, hi: int, ivs: list[tuple[int, int]]) -> bool:
    pos = lo
    for s, e in sorted(ivs):
        if s > pos:
            break
        pos = max(pos, e)
        if pos >= hi:
            return True
    return pos >= hi


def model_blocks(extents: list[tuple[int, int, bool]], disk: int, bs: int, start: int) -> dict[int, bool]:
    """block index -> zero? for every block the copy must touch."""
    out = {}
    for b in range(-(-disk // bs)):
        lo, hi = b * bs, min((b + 1) * bs, disk)
        if lo < start:
            continue
        hit = [(o, n, z) for o, n, z in extents if n > 0 and o < hi and o + n > lo]
        if not hit:
            continue
        data = any(not z for _, _, z in hit)
        zero_cover = _covered(lo, hi, [(o, o + n) for o, n, z in extents if z and n > 0])
        out[b] = not data and zero_cover
    return out


def blocks_of(segments: list[tuple[int, int, bool]], bs: int) -> dict[int, bool]:
    out = {}
    for s, e, z in segments:
        for b in range(s // bs, -(-e // bs)):
            assert b not in out
            out[b] = z
    return out


@st.composite
def extent_cases(draw: st.DrawFn) -> tuple[list[tuple[int, int, bool]], int, int, int]:
    bs = draw(st.sampled_from([4096, 8192, 65536]))
    disk = draw(st.integers(0, 12 * bs))
    n = draw(st.integers(0, 12))
    ext = []
    for _ in range(n):
        off = draw(st.integers(0, disk))
        length = draw(st.integers(0, disk - off))
        if draw(st.booleans()) and disk:  # aligned extents, often touching
            off = draw(st.integers(0, disk // bs)) * bs
            length = min(disk - off, draw(st.integers(0, 3)) * bs)
        ext.append((off, length, draw(st.booleans())))
    start = draw(st.integers(0, -(-disk // bs))) * bs
    start = min(start, disk)
    return ext, disk, bs, start


@settings(max_examples=400, deadline=None)
@given(extent_cases())
def test_normalize_matches_block_model(case: tuple[list[tuple[int, int, bool]], int, int, int]) -> None:
    ext, disk, bs, start = case
    segs = _c.normalize(ext, disk, bs, start)
    # sorted, non-overlapping, block aligned, merged
    for (_s1, e1, z1), (s2, _e2, z2) in itertools.pairwise(segs):
        assert e1 <= s2
        assert not (e1 == s2 and z1 == z2)
    for s, e, _ in segs:
        assert s < e <= disk
        assert s % bs == 0
        assert e % bs == 0 or e == disk
    assert blocks_of(segs, bs) == model_blocks(ext, disk, bs, start)


def test_normalize_examples() -> None:
    bs = 65536
    # zero extent with unaligned edges: edges are data, inside is zero
    assert _c.normalize([(1000, 4 * bs, True)], 10 * bs, bs) == [
        (0, bs, False),
        (bs, 4 * bs, True),
        (4 * bs, 5 * bs, False),
    ]
    # two touching zero extents cover one block
    assert _c.normalize([(0, 100, True), (100, bs - 100, True)], bs, bs) == [(0, bs, True)]
    # data wins over zero
    assert _c.normalize([(0, 2 * bs, True), (bs + 5, 1, False)], 4 * bs, bs) == [
        (0, bs, True),
        (bs, 2 * bs, False),
    ]
    # partial last block, zero up to the end of the disk
    assert _c.normalize([(bs, bs + 512, True)], 2 * bs + 512, bs) == [(bs, 2 * bs + 512, True)]
    # resume offset
    assert _c.normalize([(0, 4 * bs, False)], 4 * bs, bs, 2 * bs) == [(2 * bs, 4 * bs, False)]


# ---- plan_extents against a per-granule model -------------------------------------


def model_plan(
    alloc: list[tuple[int, int, int]], dirty: list[tuple[int, int, int]] | None, disk: int, g: int
) -> dict[int, bool]:
    zeros = [(o, min(o + n, disk)) for o, n, f in alloc if f & 2]
    out = {}
    for k in range(-(-disk // g)):
        lo, hi = k * g, min((k + 1) * g, disk)
        z = _covered(lo, hi, zeros)
        if dirty is None:
            if not z:
                out[k] = False
        elif any(f & 1 and n > 0 and o < hi and o + n > lo for o, n, f in dirty):
            out[k] = z
    return out


@st.composite
def plan_cases(
    draw: st.DrawFn,
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]] | None, int, int]:
    g = draw(st.sampled_from([512, 4096, 65536, 3000]))
    disk = draw(st.integers(0, 10 * g))

    def entries() -> list[tuple[int, int, int]]:
        out = []
        for _ in range(draw(st.integers(0, 10))):
            off = draw(st.integers(0, disk + g))
            out.append((off, draw(st.integers(0, 4 * g)), draw(st.integers(0, 3))))
        return out

    return entries(), (None if draw(st.booleans()) else entries()), disk, g


@settings(max_examples=400, deadline=None)
@given(plan_cases())
def test_plan_extents_matches_granule_model(
    case: tuple[list[tuple[int, int, int]], list[tuple[int, int, int]] | None, int, int],
) -> None:
    alloc, dirty, disk, g = case
    plan = plan_extents(alloc, dirty, disk_size=disk, granularity=g)
    got: dict[int, bool] = {}
    for a, b in itertools.pairwise(plan):
        assert a.end <= b.offset
        assert not (a.end == b.offset and a.zero == b.zero)
    for e in plan:
        assert e.length > 0 and e.end <= disk
        assert e.offset % g == 0 and (e.end % g == 0 or e.end == disk)
        for k in range(e.offset // g, -(-e.end // g)):
            got[k] = e.zero
    assert got == model_plan(alloc, dirty, disk, g)


def test_plan_extents_examples() -> None:
    M = MiB
    alloc = [(0, M, 0), (M, 2 * M, 3), (3 * M, M, 0)]
    assert plan_extents(alloc, None, disk_size=4 * M, granularity=65536) == [Extent(0, M), Extent(3 * M, M)]
    dirty = [(0, 4096, 1), (M - 1, 2, 1), (2 * M, 100, 1), (3 * M, M, 0)]
    assert plan_extents(alloc, dirty, disk_size=4 * M, granularity=65536) == [
        Extent(0, 65536),
        Extent(M - 65536, 65536),
        Extent(M, 65536, zero=True),
        Extent(2 * M, 65536, zero=True),
    ]
    # HOLE without ZERO (e.g. a backing file shows through) is data
    assert plan_extents([(0, M, 1)], None, disk_size=M, granularity=4096) == [Extent(0, M)]
    with pytest.raises(TypeError):
        plan_extents([(0, "x", 0)], None, disk_size=M, granularity=4096)  # type: ignore[list-item]
    with pytest.raises(ValueError):
        plan_extents([], None, disk_size=M, granularity=0)


# ---- option validation fuzzing ------------------------------------------------------

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.integers(-(2**70), 2**70),
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=2),
)


@st.composite
def stream_args(draw: st.DrawFn) -> tuple[dict[str, object], object]:
    """Half of the cases are fully valid (they must reach run()), the others
    mix valid values with junk in any field."""
    valid = draw(st.booleans())

    def pick(good: st.SearchStrategy[object], bad: st.SearchStrategy[object]) -> object:
        if valid or draw(st.integers(0, 3)):
            return draw(good)
        return draw(st.one_of(bad, junk))

    disk = pick(st.integers(0, 4 * MiB), st.integers(-5, -1))
    kw: dict[str, object] = {"disk_size": disk}
    bs = pick(st.sampled_from([4096, 65536, 1 << 24]), st.sampled_from([3000, 1 << 25, 0, 2048]))
    size = disk if isinstance(disk, int) and not isinstance(disk, bool) and disk >= 0 else 0
    good_bs = bs if isinstance(bs, int) and not isinstance(bs, bool) and bs > 0 else 65536
    has_manifest = draw(st.booleans())
    opts: dict[str, tuple[st.SearchStrategy[object], st.SearchStrategy[object]]] = {
        "block_size": (st.just(bs), st.just(bs)),
        "hash": (
            st.sampled_from(["xxh128", "blake2b"] + ([] if has_manifest else ["none"])),
            st.sampled_from(["md5", "", "XXH128"]),
        ),
        "compare": (st.just(False) if not has_manifest else st.booleans(), st.just(True)),
        "max_request": (st.integers(4096, 8 * MiB), st.integers(-1, 4095)),
        "connections": (st.integers(1, 8), st.sampled_from([0, 65, -1])),
        "in_flight": (st.integers(1, 64), st.sampled_from([0, 1025])),
        "rate_limit": (st.one_of(st.none(), st.integers(1, 10**9)), st.sampled_from([0, -5])),
        "allow_trim": (st.booleans(), st.just(1)),
        "start_offset": (st.integers(0, size // good_bs).map(lambda b: b * good_bs), st.integers(1, 4095)),
        "flush_interval": (st.integers(1, 10**9), st.sampled_from([0, -1])),
    }
    for name, (good, bad) in opts.items():
        if draw(st.booleans()):
            kw[name] = pick(good, bad)
    if has_manifest:
        # A junk disk_size can be up to 2**70: its manifest would not fit in memory (an
        # OOM kill of the whole test run), so such a case gets a small, wrong-sized one,
        # which the constructor must refuse just the same.
        exact = -(-min(size, 4 * MiB) // good_bs) * 16
        kind = draw(st.sampled_from(["exact"] * 4 if valid else ["exact", "longer", "bytes", "view", "junk"]))
        kw["manifest"] = {
            "exact": lambda: bytearray(exact),
            "longer": lambda: bytearray(exact + 16),
            "bytes": lambda: bytes(exact),
            "view": lambda: memoryview(bytearray(exact)),
            "junk": lambda: draw(junk),
        }[kind]()
    good_ext = st.lists(
        st.builds(
            lambda o, n, z: Extent(min(o, size), min(n, size - min(o, size)), z),
            st.integers(0, size),
            st.integers(0, size),
            st.booleans(),
        ),
        max_size=6,
    )
    bad_ext = st.one_of(st.lists(extent_items, max_size=6), junk)
    return kw, pick(good_ext, bad_ext)


extent_items = st.one_of(
    st.builds(
        lambda o, n, z: Extent(o, n, z), st.integers(0, 5 * MiB), st.integers(0, 5 * MiB), st.booleans()
    ),
    st.tuples(st.integers(-10, 5 * MiB), st.integers(-10, 5 * MiB)),
    st.tuples(st.integers(0, 5 * MiB), st.integers(0, MiB), st.booleans()),
    junk,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
@given(args=stream_args())
def test_fuzz_stream_options(args: tuple[dict[str, object], object]) -> None:
    """Invalid options raise ValueError/TypeError; valid ones build a Stream
    whose run() against a missing server raises BlockstreamError."""
    kw, extents = args
    with tempfile.TemporaryDirectory() as d:
        uri = f"nbd+unix:///?socket={d}/missing.sock"
        try:
            s = Stream(uri, uri, extents, **kw)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            return
        p = s.progress()
        assert p.bytes_total >= 0 and not p.done
        with pytest.raises(BlockstreamError) as ei:
            s.run()
        assert not isinstance(ei.value, Cancelled)
        assert ei.value.endpoint in ("source", "destination")
        assert ei.value.errno == errno.ENOENT and ei.value.nbd_error


@settings(max_examples=200, deadline=None)
@given(args=stream_args())
def test_fuzz_c_engine_directly(args: tuple[dict[str, object], object]) -> None:
    """The private C constructor re-validates everything (no crash)."""
    kw, extents = args
    kw = dict(kw)
    kw.pop("manifest", None)
    items = (
        [(e.offset, e.length, e.zero) if isinstance(e, Extent) else e for e in extents]
        if isinstance(extents, list)
        else extents
    )
    try:
        s = _c.Stream("nbd+unix:///?socket=/nonexistent", None, items, **kw)
    except (ValueError, TypeError, OverflowError):
        return
    assert len(s.progress()) == len(dataclasses.fields(blockstream.Progress))


def test_stream_validation_messages() -> None:
    uri = "nbd+unix:///?socket=/nonexistent"
    with pytest.raises(ValueError, match="beyond disk_size"):
        Stream(uri, uri, [Extent(0, 2 * MiB)], disk_size=MiB)
    with pytest.raises(ValueError, match="compare"):
        Stream(uri, uri, [], disk_size=MiB, compare=True)
    with pytest.raises(ValueError, match="manifest"):
        Stream(uri, uri, [], disk_size=MiB, manifest=bytearray(3))
    with pytest.raises(TypeError, match="bytearray"):
        Stream(uri, uri, [], disk_size=MiB, manifest=bytes(16))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="none"):
        Stream(uri, uri, [], disk_size=MiB, manifest=zero_manifest(MiB), hash="none")
    with pytest.raises(ValueError, match="multiple of block_size"):
        Stream(uri, uri, [], disk_size=MiB, start_offset=100)
    with pytest.raises(ValueError, match="power of two"):
        Stream(uri, uri, [], disk_size=MiB, block_size=3 * 4096)
    with pytest.raises(TypeError):
        Stream(uri, uri, [Extent(0, 1)], disk_size=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Extent(-1, 5)
    with pytest.raises(TypeError):
        Extent(0, 5, zero=1)  # type: ignore[arg-type]
    s = Stream(uri, None, [Extent(0, 1)], disk_size=MiB)
    with pytest.raises(ValueError):
        s.set_rate_limit(0)


def test_cancel_before_run_and_run_once() -> None:
    uri = "nbd+unix:///?socket=/nonexistent"
    s = Stream(uri, None, [Extent(0, MiB)], disk_size=MiB)
    s.cancel()
    with pytest.raises(Cancelled):
        s.run()
    with pytest.raises(BlockstreamError, match="once"):
        s.run()


def test_progress_totals_before_run() -> None:
    uri = "nbd+unix:///?socket=/nonexistent"
    s = Stream(uri, uri, [Extent(100, 10), Extent(200_000, 5, zero=True)], disk_size=MiB, start_offset=0)
    p = s.progress()
    assert (p.bytes_total, p.extents_total, p.durable_offset, p.done) == (2 * 65536, 2, 0, False)


def test_api_constants() -> None:
    assert blockstream.BLOCK_SIZE_DEFAULT == 65536
    assert blockstream.HASH_SIZE == 16
