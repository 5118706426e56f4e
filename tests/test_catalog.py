"""The catalog against SQLite (a file) and a real PostgreSQL started by the harness."""

from __future__ import annotations

import hashlib
import itertools
import os
import pickle
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from harness.postgres import PostgresCluster, postgres_cluster

from transcend.catalog import (
    AlreadyExists,
    Catalog,
    CatalogError,
    CycleRecord,
    InUse,
    NotFoundError,
)
from transcend.config import Settings
from transcend.models import (
    ChangeKind,
    Checkpoint,
    DiskInfo,
    Health,
    PlatformSpec,
    PointDisk,
    ProtectionPolicy,
    ProtectionSpec,
    ProtectionState,
    RecoveryPoint,
    Workload,
    WorkloadRef,
)
from transcend.secrets import SecretBox, SecretError

PLAINTEXT = "pl4intext-Passw0rd-that-must-not-leak"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PostgresCluster]:
    with postgres_cluster() as pg:
        yield pg


_db_names = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/catalog.sqlite"
        return
    pg: PostgresCluster = request.getfixturevalue("pg_cluster")
    name = f"catalog_{os.getpid()}_{next(_db_names)}"
    yield pg.create_database(name)
    pg.drop_database(name)


@pytest.fixture
def box() -> SecretBox:
    return SecretBox([SecretBox.generate_key()])


@pytest.fixture
def catalog(db_url: str, box: SecretBox) -> Iterator[Catalog]:
    c = Catalog(db_url, box)
    yield c
    c.close()


def raw(url: str, query: str, **params: object) -> list[tuple[object, ...]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(query), params)]
    finally:
        engine.dispose()


def platforms(c: Catalog) -> None:
    c.add_platform(
        PlatformSpec(
            name="src",
            kind="kvm",
            config={"uri": "qemu:///system"},
            secret={"password": PLAINTEXT},
        )
    )
    c.add_platform(PlatformSpec(name="dst", kind="kvm", site="dr", config={"dir": "/srv/r"}))


def workload(vm: str = "vm1", disks: tuple[str, ...] = ("vda", "vdb")) -> Workload:
    return Workload(
        ref=WorkloadRef(platform="src", id=vm),
        name=vm,
        cpus=2,
        memory_mib=512,
        disks=[DiskInfo(id=d, size=1 << 30) for d in disks],
    )


def spec(name: str = "web", rpo: int = 60) -> ProtectionSpec:
    return ProtectionSpec(
        name=name,
        source_platform="src",
        target_platform="dst",
        workloads=["vm1"],
        policy=ProtectionPolicy(rpo_seconds=rpo),
    )


def protected(c: Catalog, name: str = "web") -> None:
    if not c.list_platforms():
        platforms(c)
    c.add_protection(spec(name), [workload()])


def rp(protection: str, seq: int, *, instant: datetime | None = None, loc: str = "") -> RecoveryPoint:
    t = instant or T0 + timedelta(minutes=seq)
    return RecoveryPoint(
        id=f"{protection}-{seq}",
        protection=protection,
        seq=seq,
        instant=t,
        committed_at=t + timedelta(seconds=7),
        disks=[
            PointDisk(disk=d, size=1 << 30, location=loc or f"/r/{d}.{seq}", block_size=65536)
            for d in ("vda", "vdb")
        ],
        bytes_written=seq * 1000,
        kind=ChangeKind.FULL if seq == 1 else ChangeKind.INCREMENTAL,
    )


def cps(tag: str) -> list[Checkpoint]:
    return [Checkpoint(disk=d, token=f"{tag}-{d}", identity="uuid-1") for d in ("vda", "vdb")]


def manifests(tag: str) -> dict[str, bytes]:
    return {d: f"manifest {tag} {d}".encode() * 100 for d in ("vda", "vdb")}


def is_utc(t: datetime | None) -> bool:
    return t is not None and t.tzinfo is not None and t.utcoffset() == timedelta(0)


# --------------------------------------------------------------------------- platforms


def test_platform_round_trip(catalog: Catalog) -> None:
    platforms(catalog)
    src = catalog.get_platform("src")
    assert (src.name, src.kind, src.site, src.config) == ("src", "kvm", "local", {"uri": "qemu:///system"})
    assert [p.name for p in catalog.list_platforms()] == ["dst", "src"]
    assert catalog.platform_secret("src") == {"password": PLAINTEXT}
    assert catalog.platform_secret("dst") == {}

    with pytest.raises(AlreadyExists, match=r"platform 'src' already exists.*replace"):
        catalog.add_platform(PlatformSpec(name="src", kind="vmware"))
    info = catalog.add_platform(
        PlatformSpec(name="src", kind="kvm", config={"uri": "qemu+ssh://h/system"}, secret={"k": "v"}),
        replace=True,
    )
    assert info.config == {"uri": "qemu+ssh://h/system"}
    assert catalog.platform_secret("src") == {"k": "v"}

    catalog.remove_platform("dst")
    assert [p.name for p in catalog.list_platforms()] == ["src"]


def test_not_found_names_the_object_and_known_names(catalog: Catalog) -> None:
    platforms(catalog)
    with pytest.raises(NotFoundError) as e:
        catalog.get_platform("nope")
    assert "platform 'nope' not found" in str(e.value)
    assert "known platforms: dst, src" in str(e.value)
    assert (e.value.kind, e.value.name, e.value.known) == ("platform", "nope", ["dst", "src"])
    assert isinstance(e.value, CatalogError) and isinstance(e.value, LookupError)
    copy = pickle.loads(pickle.dumps(e.value))  # crosses process boundaries intact
    assert str(copy) == str(e.value)

    with pytest.raises(NotFoundError, match=r"protection 'ghost' not found.*no protections yet"):
        catalog.get_protection("ghost")
    for call in (
        lambda: catalog.points("ghost"),
        lambda: catalog.checkpoints("ghost"),
        lambda: catalog.next_seq("ghost"),
        lambda: catalog.cycles("ghost"),
        lambda: catalog.set_protection_state("ghost", ProtectionState.PAUSED),
        lambda: catalog.remove_protection("ghost"),
    ):
        with pytest.raises(NotFoundError, match=r"protection 'ghost'"):
            call()
    with pytest.raises(NotFoundError, match=r"recovery point 'x-1' not found"):
        catalog.get_point("x-1")
    with pytest.raises(NotFoundError, match=r"platform 'gone'"):
        catalog.remove_platform("gone")


def test_secrets_encrypted_at_rest(catalog: Catalog, db_url: str) -> None:
    platforms(catalog)
    rows = raw(db_url, "SELECT * FROM platforms")
    assert rows and PLAINTEXT not in repr(rows)
    assert all("password" not in repr(r) for r in rows)
    if db_url.startswith("sqlite"):
        db = Path(db_url.removeprefix("sqlite:///"))
        files = [p for p in db.parent.iterdir() if p.name.startswith(db.name)]
        assert files
        for f in files:  # the database and its WAL
            assert PLAINTEXT.encode() not in f.read_bytes(), f
    else:
        dump = raw(db_url, "SELECT string_agg(t::text, ' ') FROM platforms t")[0][0]
        assert isinstance(dump, str) and "src" in dump and PLAINTEXT not in dump
    assert catalog.platform_secret("src")["password"] == PLAINTEXT


def test_wrong_key_says_the_key_file_does_not_match(db_url: str, tmp_path: Path) -> None:
    c = Catalog(db_url, SecretBox.from_key_file(tmp_path / "keys" / "a.key"))
    platforms(c)
    c.close()
    other = Catalog(db_url, SecretBox.from_key_file(tmp_path / "keys" / "b.key"))
    try:
        assert other.get_platform("src").name == "src"  # non-secret data still readable
        with pytest.raises(SecretError) as e:
            other.platform_secret("src")
        msg = str(e.value)
        assert "platform 'src'" in msg and "b.key does not match the catalog" in msg
        assert "TRANSCEND_SECRET_KEY_FILE" in msg and "--replace" in msg
    finally:
        other.close()


def test_key_rotation(db_url: str, tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "catalog.key"
    c = Catalog(db_url, SecretBox.from_key_file(key_file))
    platforms(c)
    old_token = raw(db_url, "SELECT secret_enc FROM platforms WHERE name = 'src'")[0][0]
    old_key = key_file.read_text().split()[0]
    c.close()

    rotated = SecretBox.rotate_key_file(key_file)
    assert rotated.key_count == 2 and key_file.read_text().split()[1] == old_key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    c = Catalog(db_url, SecretBox.from_key_file(key_file))
    assert c.platform_secret("src") == {"password": PLAINTEXT}  # old key still decrypts
    assert c.reencrypt_secrets() == 2
    c.close()
    assert raw(db_url, "SELECT secret_enc FROM platforms WHERE name = 'src'")[0][0] != old_token

    new_only = Catalog(db_url, SecretBox([key_file.read_text().split()[0]]))
    old_only = Catalog(db_url, SecretBox([old_key]))
    try:
        assert new_only.platform_secret("src") == {"password": PLAINTEXT}
        with pytest.raises(SecretError, match=r"does not match the catalog"):
            old_only.platform_secret("src")
    finally:
        new_only.close()
        old_only.close()


def test_key_file_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "keys" / "catalog.key"
    box = SecretBox.from_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    token = box.encrypt({"a": "b"})
    assert PLAINTEXT not in token
    assert SecretBox.from_key_file(path).decrypt(token) == {"a": "b"}
    assert [p.name for p in path.parent.iterdir()] == ["catalog.key"]  # no temp files left

    path.write_text("# nothing\n")
    with pytest.raises(SecretError, match=r"holds no key"):
        SecretBox.from_key_file(path)
    path.write_text("not-a-key\n")
    with pytest.raises(SecretError, match=r"invalid encryption key in .*catalog.key"):
        SecretBox.from_key_file(path)


def test_from_settings(tmp_path: Path) -> None:
    home = tmp_path / "home"
    c = Catalog.from_settings(Settings(home=home))
    try:
        assert (home / "catalog.sqlite").exists()
        key = home / "keys" / "catalog.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
        platforms(c)
    finally:
        c.close()
    explicit = tmp_path / "elsewhere.key"
    c = Catalog.from_settings(Settings(home=home, secret_key_file=str(explicit)))
    try:
        assert explicit.exists()
        with pytest.raises(SecretError, match=r"elsewhere.key does not match"):
            c.platform_secret("src")
    finally:
        c.close()


# --------------------------------------------------------------------------- protections


def test_protection_round_trip(catalog: Catalog) -> None:
    platforms(catalog)
    before = datetime.now(UTC)
    rec = catalog.add_protection(spec("web"), [workload()])
    assert rec.name == "web" and rec.spec == spec("web")
    assert rec.workloads == [workload()]
    assert (rec.state, rec.health, rec.health_reason) == (ProtectionState.PREPARING, Health.HEALTHY, "")
    assert is_utc(rec.created_at) and rec.created_at >= before - timedelta(seconds=1)
    assert catalog.get_protection("web") == rec

    catalog.add_protection(spec("db", rpo=300), [workload("vm2", ("sda",)), workload("vm3")])
    assert [p.name for p in catalog.list_protections()] == ["db", "web"]
    db = catalog.list_protections()[0]
    assert [w.name for w in db.workloads] == ["vm2", "vm3"]

    with pytest.raises(AlreadyExists, match=r"protection 'web' already exists"):
        catalog.add_protection(spec("web"), [])

    r = catalog.set_protection_state("web", ProtectionState.PROTECTING)
    assert (r.state, r.health) == (ProtectionState.PROTECTING, Health.HEALTHY)
    assert r.updated_at >= r.created_at
    r = catalog.set_protection_state(
        "web", ProtectionState.PROTECTING, health=Health.WARNING, reason="RPO missed"
    )
    assert (r.health, r.health_reason) == (Health.WARNING, "RPO missed")
    r = catalog.set_protection_state("web", ProtectionState.PAUSED)  # health kept
    assert (r.state, r.health, r.health_reason) == (ProtectionState.PAUSED, Health.WARNING, "RPO missed")
    r = catalog.set_protection_state("web", ProtectionState.PROTECTING, health=Health.HEALTHY)
    assert (r.health, r.health_reason) == (Health.HEALTHY, "")

    policy = ProtectionPolicy(rpo_seconds=30, retention="all 1h, daily 1w", continuous=True)
    r = catalog.update_policy("web", policy)
    assert r.spec.policy == policy
    assert catalog.get_protection("web").spec.policy.retention.describe() == "all for 1h, every 1d for 1w"

    catalog.update_workloads("web", [workload("vm1", ("vda", "vdb", "vdc"))])
    assert [d.id for d in catalog.get_protection("web").workloads[0].disks] == ["vda", "vdb", "vdc"]
    catalog.update_workloads("web", [])
    assert catalog.get_protection("web").workloads == []
    assert catalog.get_protection("db").workloads == db.workloads  # untouched


def test_protection_needs_known_platforms(catalog: Catalog) -> None:
    platforms(catalog)
    bad = ProtectionSpec(
        name="x",
        source_platform="src",
        target_platform="nowhere",
        workloads=["vm1"],
        policy=ProtectionPolicy(rpo_seconds=60),
    )
    with pytest.raises(NotFoundError, match=r"platform 'nowhere' not found.*known platforms: dst, src"):
        catalog.add_protection(bad, [workload()])
    assert catalog.list_protections() == []


def test_remove_platform_in_use_refused(catalog: Catalog) -> None:
    protected(catalog, "web")
    protected(catalog, "app")
    for name in ("src", "dst"):
        with pytest.raises(InUse, match=f"platform '{name}' is in use by protection.s. app, web"):
            catalog.remove_platform(name)
    assert [p.name for p in catalog.list_platforms()] == ["dst", "src"]
    catalog.remove_protection("web")
    catalog.remove_protection("app")
    catalog.remove_platform("src")
    assert [p.name for p in catalog.list_platforms()] == ["dst"]


# --------------------------------------------------------------------------- points


def test_points_round_trip(catalog: Catalog) -> None:
    protected(catalog)
    assert catalog.next_seq("web") == 1
    assert catalog.points("web") == [] and catalog.latest_point("web") is None
    assert catalog.checkpoints("web") == {}

    stored = []
    for seq in (1, 2, 3):
        assert catalog.next_seq("web") == seq
        stored.append(catalog.commit_point(rp("web", seq), manifests(str(seq)), cps(f"c{seq}")))
    assert catalog.next_seq("web") == 4
    assert catalog.points("web") == stored
    assert [p.seq for p in stored] == [1, 2, 3]
    assert catalog.latest_point("web") == stored[-1]
    assert catalog.get_point("web-2") == stored[1]
    assert catalog.manifest("web-2", "vdb") == manifests("2")["vdb"]
    # manifest digests are filled in from the blobs
    assert stored[1].disks[1].manifest_sha256 == hashlib.sha256(manifests("2")["vdb"]).hexdigest()
    assert {d: c.token for d, c in catalog.checkpoints("web").items()} == {
        "vda": "c3-vda",
        "vdb": "c3-vdb",
    }
    p = stored[0]
    assert p.kind == ChangeKind.FULL and p.bytes_written == 1000
    assert p.instant == T0 + timedelta(minutes=1) and is_utc(p.instant) and is_utc(p.committed_at)

    with pytest.raises(NotFoundError, match=r"disk 'vdz' not found.*known .*: vda, vdb"):
        catalog.manifest("web-2", "vdz")
    with pytest.raises(NotFoundError, match=r"recovery point 'web-9'"):
        catalog.manifest("web-9", "vda")


def test_datetimes_are_utc_in_and_out(catalog: Catalog) -> None:
    protected(catalog)
    plus2 = timezone(timedelta(hours=2))
    local = datetime(2026, 3, 1, 14, 0, tzinfo=plus2)  # 12:00 UTC
    naive = datetime(2026, 3, 1, 12, 5)  # taken as UTC
    a = catalog.commit_point(rp("web", 1, instant=local), {}, [])
    b = catalog.commit_point(
        rp("web", 2, instant=naive),
        {},
        [Checkpoint(disk="vda", token="t", instant=local)],
    )
    assert a.instant == T0 and a.instant.tzinfo == UTC
    assert b.instant == datetime(2026, 3, 1, 12, 5, tzinfo=UTC) and b.instant.tzinfo == UTC
    for p in catalog.points("web"):
        assert p.instant.tzinfo == UTC and p.committed_at.tzinfo == UTC
    assert catalog.checkpoints("web")["vda"].instant == T0
    assert catalog.checkpoints("web")["vda"].instant.tzinfo == UTC  # type: ignore[union-attr]


def test_commit_point_is_idempotent(catalog: Catalog, db_url: str) -> None:
    protected(catalog)
    first = catalog.commit_point(rp("web", 1), manifests("a"), cps("a"))
    # a retried commit (same id) with different content changes nothing
    again = catalog.commit_point(rp("web", 1, loc="/elsewhere"), manifests("b"), cps("b"))
    assert again == first
    assert catalog.points("web") == [first]
    assert catalog.manifest("web-1", "vda") == manifests("a")["vda"]
    assert {c.token for c in catalog.checkpoints("web").values()} == {"a-vda", "a-vdb"}
    assert raw(db_url, "SELECT count(*) FROM manifests")[0][0] == 2


def test_commit_point_is_all_or_nothing(
    catalog: Catalog, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    protected(catalog)
    one = catalog.commit_point(rp("web", 1), manifests("1"), cps("one"))

    real = Catalog._put_checkpoint
    calls = []

    def failing(self: Catalog, s: object, protection: str, cp: Checkpoint, point_id: str | None) -> None:
        calls.append(cp.disk)
        if len(calls) == 2:  # the point, its manifests and vda's checkpoint are written by now
            raise RuntimeError("disk full (simulated)")
        real(self, s, protection, cp, point_id)  # type: ignore[arg-type]

    monkeypatch.setattr(Catalog, "_put_checkpoint", failing)
    with pytest.raises(RuntimeError, match=r"simulated"):
        catalog.commit_point(rp("web", 2), manifests("2"), cps("two"))
    assert calls == ["vda", "vdb"]
    monkeypatch.setattr(Catalog, "_put_checkpoint", real)

    # nothing of the failed commit is visible
    assert catalog.points("web", include_deleting=True) == [one]
    assert {c.token for c in catalog.checkpoints("web").values()} == {"one-vda", "one-vdb"}
    assert raw(db_url, "SELECT count(*) FROM manifests")[0][0] == 2
    assert raw(db_url, "SELECT count(*) FROM recovery_points")[0][0] == 1
    assert catalog.next_seq("web") == 2
    with pytest.raises(NotFoundError):
        catalog.manifest("web-2", "vda")

    # the retry succeeds and replaces both checkpoints together
    two = catalog.commit_point(rp("web", 2), manifests("2"), cps("two"))
    assert catalog.points("web") == [one, two]
    assert {c.token for c in catalog.checkpoints("web").values()} == {"two-vda", "two-vdb"}


def test_commit_point_replaces_only_the_given_disks(catalog: Catalog) -> None:
    protected(catalog)
    catalog.commit_point(rp("web", 1), {}, cps("one"))
    catalog.commit_point(rp("web", 2), {}, [Checkpoint(disk="vdb", token="two-vdb")])
    assert {d: c.token for d, c in catalog.checkpoints("web").items()} == {
        "vda": "one-vda",
        "vdb": "two-vdb",
    }
    catalog.clear_checkpoints("web")
    assert catalog.checkpoints("web") == {}


def test_staged_manifests_between_sites(catalog: Catalog) -> None:
    """stream.disk (source site) stages a manifest; verify/commit (target site, maybe
    another host) read it from the catalog; a retried stream replaces it; commit or
    abort drops the cycle's rows; removing the protection drops them too."""
    protected(catalog)
    blob = os.urandom(4096)
    catalog.stage_manifest("web", "c1", "vda", blob)
    catalog.stage_manifest("web", "c1", "vdb", b"x" * 32)
    catalog.stage_manifest("web", "c1", "vda", blob[::-1])  # a retried stream
    assert catalog.staged_manifest("web", "c1", "vda") == blob[::-1]
    with pytest.raises(NotFoundError, match="has not finished"):
        catalog.staged_manifest("web", "c2", "vda")
    with pytest.raises(NotFoundError):
        catalog.stage_manifest("nope", "c1", "vda", blob)
    catalog.drop_staged_manifests("web", "c1")
    catalog.drop_staged_manifests("web", "c1")  # idempotent
    with pytest.raises(NotFoundError):
        catalog.staged_manifest("web", "c1", "vdb")
    catalog.stage_manifest("web", "c3", "vda", blob)
    catalog.remove_protection("web")
    protected(catalog)
    with pytest.raises(NotFoundError):
        catalog.staged_manifest("web", "c3", "vda")


def test_commit_point_rejects_bad_input(catalog: Catalog) -> None:
    protected(catalog)
    catalog.commit_point(rp("web", 1), {}, [])
    other = rp("web", 1).model_copy(update={"id": "web-other"})
    with pytest.raises(AlreadyExists, match=r"web #1.*taken by 'web-1'.*next_seq"):
        catalog.commit_point(other, {}, [])
    with pytest.raises(CatalogError, match=r"manifests given for disks \['sdz'\]"):
        catalog.commit_point(rp("web", 2), {"sdz": b"x"}, [])
    with pytest.raises(CatalogError, match=r"two checkpoints for the same disk"):
        catalog.commit_point(rp("web", 2), {}, [*cps("x"), *cps("y")])
    with pytest.raises(NotFoundError, match=r"protection 'nope'"):
        catalog.commit_point(rp("nope", 1), {}, [])
    assert [p.seq for p in catalog.points("web")] == [1]


def test_deleting_points(catalog: Catalog, db_url: str) -> None:
    protected(catalog)
    pts = [catalog.commit_point(rp("web", s), manifests(str(s)), cps(str(s))) for s in (1, 2, 3)]
    catalog.mark_deleting("web-1")
    catalog.mark_deleting("web-1")  # idempotent
    catalog.mark_deleting("web-3")
    assert catalog.points("web") == [pts[1]]
    assert catalog.points("web", include_deleting=True) == pts
    assert catalog.deleting_points("web") == [pts[0], pts[2]]
    assert catalog.latest_point("web") == pts[1]
    assert catalog.get_point("web-1") == pts[0]  # still readable by id until finished

    catalog.finish_delete("web-1")
    catalog.finish_delete("web-1")  # idempotent
    catalog.finish_delete("never-existed")
    catalog.finish_delete("web-3")
    assert catalog.deleting_points("web") == []
    assert catalog.points("web", include_deleting=True) == [pts[1]]
    with pytest.raises(NotFoundError):
        catalog.get_point("web-1")
    with pytest.raises(NotFoundError):
        catalog.manifest("web-1", "vda")
    assert raw(db_url, "SELECT count(*) FROM manifests")[0][0] == 2
    # sequence numbers are never reused, even when the newest point went away
    assert catalog.next_seq("web") == 4
    with pytest.raises(NotFoundError, match=r"recovery point 'web-9'"):
        catalog.mark_deleting("web-9")


def test_update_point(catalog: Catalog) -> None:
    protected(catalog)
    catalog.commit_point(rp("web", 1), manifests("1"), [])
    merged = rp("web", 1, loc="/r/merged")
    catalog.update_point(merged)
    got = catalog.get_point("web-1")
    assert [d.location for d in got.disks] == ["/r/merged", "/r/merged"]
    assert catalog.manifest("web-1", "vda") == manifests("1")["vda"]
    with pytest.raises(CatalogError, match=r"cannot change"):
        catalog.update_point(rp("web", 1).model_copy(update={"seq": 5}))
    with pytest.raises(NotFoundError):
        catalog.update_point(rp("web", 7))


def test_remove_protection_deletes_its_rows(catalog: Catalog, db_url: str) -> None:
    protected(catalog, "web")
    protected(catalog, "app")
    for name in ("web", "app"):
        for s in (1, 2):
            catalog.commit_point(rp(name, s), manifests(f"{name}{s}"), cps(f"{name}{s}"))
        catalog.record_cycle(
            CycleRecord(cycle_id=f"{name}-c", protection=name, started_at=T0, status="committed")
        )
    catalog.mark_deleting("web-1")
    catalog.remove_protection("web")
    with pytest.raises(NotFoundError):
        catalog.get_protection("web")
    counts = {
        t: raw(db_url, f"SELECT count(*) FROM {t} WHERE protection = 'web'")[0][0]
        for t in ("recovery_points", "checkpoints", "workloads", "cycles")
    }
    assert counts == dict.fromkeys(counts, 0)
    assert raw(db_url, "SELECT count(*) FROM manifests WHERE point_id LIKE 'web-%'")[0][0] == 0
    # the other protection is untouched
    assert [p.id for p in catalog.points("app")] == ["app-1", "app-2"]
    assert raw(db_url, "SELECT count(*) FROM manifests")[0][0] == 4
    assert len(catalog.cycles("app")) == 1
    # and the name can be used again from scratch
    catalog.add_protection(spec("web"), [workload()])
    assert catalog.points("web") == [] and catalog.next_seq("web") == 1


# --------------------------------------------------------------------------- cycles


def test_cycles(catalog: Catalog) -> None:
    protected(catalog)
    for i in range(5):
        catalog.record_cycle(
            CycleRecord(
                cycle_id=f"c{i}",
                protection="web",
                started_at=T0 + timedelta(minutes=i),
                status="running",
                kind="incremental",
            )
        )
    done = CycleRecord(
        cycle_id="c2",
        protection="web",
        started_at=T0 + timedelta(minutes=2),
        finished_at=datetime(2026, 3, 1, 14, 2, 30, tzinfo=timezone(timedelta(hours=2))),
        instant=T0 + timedelta(minutes=2, seconds=1),
        status="committed",
        kind="incremental",
        bytes_read=10,
        bytes_written=8,
        bytes_zero=2,
        bytes_skipped=100,
        copy_seconds=1.5,
        wall_seconds=30.0,
        rpo_seconds=61.0,
        point_id="web-2",
    )
    catalog.record_cycle(done)  # upsert
    got = catalog.cycles("web")
    assert [c.cycle_id for c in got] == ["c0", "c1", "c2", "c3", "c4"]
    assert got[2] == done
    assert got[2].finished_at == T0 + timedelta(minutes=2, seconds=30)
    assert got[2].finished_at.tzinfo == UTC  # type: ignore[union-attr]
    assert all(is_utc(c.started_at) for c in got)
    assert [c.cycle_id for c in catalog.cycles("web", since=T0 + timedelta(minutes=3))] == ["c3", "c4"]
    # the most recent `limit`, oldest first
    assert [c.cycle_id for c in catalog.cycles("web", limit=2)] == ["c3", "c4"]
    naive_since = (T0 + timedelta(minutes=4)).replace(tzinfo=None)
    assert [c.cycle_id for c in catalog.cycles("web", since=naive_since)] == ["c4"]

    with pytest.raises(NotFoundError, match=r"protection 'other'"):
        catalog.record_cycle(CycleRecord(cycle_id="x", protection="other", started_at=T0, status="failed"))
    with pytest.raises(ValueError):
        CycleRecord(cycle_id="x", protection="web", started_at=T0, status="exploded")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- concurrency, reopening


def test_concurrent_writers(db_url: str, box: SecretBox) -> None:
    """Two threads, each with its own Catalog (as two processes would have), writing at
    once; on SQLite this must wait for the lock, never fail with 'database is locked'."""
    setup = Catalog(db_url, box)
    protected(setup, "a")
    protected(setup, "b")
    setup.close()
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def writer(name: str) -> None:
        c = Catalog(db_url, box)
        try:
            start.wait()
            for s in range(1, 31):
                seq = c.next_seq(name)  # a read, then writes: the classic lock upgrade
                c.commit_point(rp(name, seq), manifests(f"{name}{seq}"), cps(f"{name}{seq}"))
                c.record_cycle(
                    CycleRecord(cycle_id=f"{name}{s}", protection=name, started_at=T0, status="committed")
                )
                c.set_protection_state(name, ProtectionState.PROTECTING)
                c.checkpoints(name)
        except BaseException as e:
            errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    check = Catalog(db_url, box)
    try:
        for name in ("a", "b"):
            assert [p.seq for p in check.points(name)] == list(range(1, 31))
            assert len(check.cycles(name)) == 30
    finally:
        check.close()


def test_shared_instance_across_threads(catalog: Catalog) -> None:
    protected(catalog)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(20):
                catalog.record_cycle(
                    CycleRecord(cycle_id=f"t{k}-{i}", protection="web", started_at=T0, status="running")
                )
                catalog.cycles("web", limit=5)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert len(catalog.cycles("web")) == 80


def test_reopen_keeps_data_and_refuses_newer_schema(db_url: str, box: SecretBox) -> None:
    c = Catalog(db_url, box)
    protected(c)
    c.commit_point(rp("web", 1), manifests("1"), cps("1"))
    c.close()
    c = Catalog(db_url, box)
    assert [p.id for p in c.points("web")] == ["web-1"]
    c.close()

    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE catalog_meta SET value = '99' WHERE key = 'schema_version'"))
    engine.dispose()
    with pytest.raises(CatalogError, match=r"schema version 99, newer than .*upgrade transcend"):
        Catalog(db_url, box)


def test_sqlite_pragmas(tmp_path: Path, box: SecretBox) -> None:
    url = f"sqlite:///{tmp_path}/sub/dir/c.sqlite"  # parent directories are created
    c = Catalog(url, box)
    try:
        engine = c._engine
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        c.close()
