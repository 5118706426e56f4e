"""The catalog: platforms, protections and their workloads, recovery points with their
manifests, source checkpoints and the cycle time series.

SQLite file by default (``$TRANSCEND_HOME/catalog.sqlite``), PostgreSQL by URL
(``postgresql+psycopg://user@host/db``); nothing else differs. Every write is one
transaction. Methods take and return the pydantic models of ``transcend.models``
(or the small ones below), never ORM rows. Datetimes are timezone-aware UTC on the
way out; naive datetimes coming in are taken as UTC.

Complex values are stored as JSON text (``model_dump_json``) next to the few
columns that are queried; manifests are opaque blobs in their own table.
Platform credentials are stored only encrypted (``transcend.secrets``).
See docs/catalog.md.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, field_validator
from pydantic import Field as PField
from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
)
from sqlalchemy.engine import Connection, Dialect, Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import registry
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, Session, SQLModel, col, select

from transcend.config import Settings
from transcend.config import settings as default_settings
from transcend.models import (
    Checkpoint,
    Health,
    PlatformInfo,
    PlatformSpec,
    ProtectionPolicy,
    ProtectionSpec,
    ProtectionState,
    RecoveryPoint,
    Workload,
)
from transcend.secrets import SecretBox, SecretError

__all__ = [
    "AlreadyExists",
    "Catalog",
    "CatalogError",
    "CycleRecord",
    "InUse",
    "NotFoundError",
    "ProtectionRecord",
    "SecretError",
]

SCHEMA_VERSION = 1
_T = TypeVar("_T")
_WRITE = "transcend_write"  # execution option: this connection's transaction writes


# --------------------------------------------------------------------------- errors


class CatalogError(Exception):
    """Base of the catalog's errors; the message names the object and what to do."""


def _names(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


class NotFoundError(CatalogError, LookupError):
    def __init__(self, kind: str, name: str, known: Sequence[str] | None = None, hint: str = "") -> None:
        self.kind, self.name, self.known, self.hint = kind, name, list(known or []), hint
        msg = f"{kind} {name!r} not found in the catalog"
        if known is not None:
            msg += f"; known {kind}s: {_names(self.known)}" if self.known else f"; no {kind}s yet"
        if hint:
            msg += f"; {hint}"
        super().__init__(msg)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.kind, self.name, self.known, self.hint))


class AlreadyExists(CatalogError):
    def __init__(self, kind: str, name: str, hint: str = "") -> None:
        self.kind, self.name, self.hint = kind, name, hint
        super().__init__(f"{kind} {name!r} already exists in the catalog" + (f"; {hint}" if hint else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.kind, self.name, self.hint))


class InUse(CatalogError):
    def __init__(self, kind: str, name: str, used_by: Sequence[str], hint: str = "") -> None:
        self.kind, self.name, self.used_by, self.hint = kind, name, list(used_by), hint
        super().__init__(
            f"{kind} {name!r} is in use by protection(s) {_names(self.used_by)}"
            + (f"; {hint}" if hint else "")
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.kind, self.name, self.used_by, self.hint))


class WrongState(CatalogError):
    """The protection's state does not allow the operation; nothing was changed."""

    def __init__(self, name: str, state: str, operation: str, hint: str = "") -> None:
        self.name, self.state, self.operation, self.hint = name, state, operation, hint
        super().__init__(f"cannot {operation} protection {name!r}: it is {state}"
                         + (f"; {hint}" if hint else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.state, self.operation, self.hint))


# --------------------------------------------------------------------------- public models


def utc(t: datetime) -> datetime:
    """Timezone-aware UTC; a naive datetime is taken as UTC."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _utc_opt(t: datetime | None) -> datetime | None:
    return None if t is None else utc(t)


def _normal_checkpoint(c: Checkpoint) -> Checkpoint:
    return c.model_copy(update={"instant": _utc_opt(c.instant)})


def _now() -> datetime:
    return datetime.now(UTC)


class ProtectionRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    spec: ProtectionSpec
    workloads: list[Workload]
    state: ProtectionState
    health: Health
    health_reason: str = ""
    created_at: datetime
    updated_at: datetime

    _utc = field_validator("created_at", "updated_at")(utc)


class CycleRecord(BaseModel):
    """One replication cycle, for the SLA time series and RPO reporting."""

    model_config = ConfigDict(extra="forbid")

    cycle_id: str
    protection: str
    started_at: datetime
    finished_at: datetime | None = None
    instant: datetime | None = None
    status: Literal["running", "committed", "failed", "aborted"]
    kind: str = ""
    bytes_read: int = PField(default=0, ge=0)
    bytes_written: int = PField(default=0, ge=0)
    bytes_zero: int = PField(default=0, ge=0)
    bytes_skipped: int = PField(default=0, ge=0)
    bytes_resent: int = PField(default=0, ge=0, description="copied again after failed "
                                                             "stream attempts (link cuts)")
    copy_seconds: float = 0.0
    wall_seconds: float = 0.0
    rpo_seconds: float | None = PField(default=None, description="previous point's instant → this commit")
    point_id: str | None = None
    error: str = ""

    _utc = field_validator("started_at", "finished_at", "instant")(_utc_opt)


# --------------------------------------------------------------------------- tables


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC; SQLite has no time zones, so there it is stored naive and read back as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else utc(value)


class _Base(SQLModel, registry=registry()):
    pass


metadata = _Base.metadata


def _when(nullable: bool = False, index: bool = False) -> Any:
    return Field(sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


def _text() -> Any:
    return Field(sa_column=Column(Text, nullable=False))


class _MetaRow(_Base, table=True):
    __tablename__ = "catalog_meta"
    key: str = Field(primary_key=True)
    value: str


class _PlatformRow(_Base, table=True):
    __tablename__ = "platforms"
    name: str = Field(primary_key=True)
    kind: str
    site: str
    config_json: str = _text()
    secret_enc: str = _text()  # Fernet token of the JSON credentials, never plaintext
    created_at: datetime = _when()
    updated_at: datetime = _when()


class _ProtectionRow(_Base, table=True):
    __tablename__ = "protections"
    name: str = Field(primary_key=True)
    source_platform: str = Field(
        sa_column=Column(String, ForeignKey("platforms.name"), nullable=False, index=True)
    )
    target_platform: str = Field(
        sa_column=Column(String, ForeignKey("platforms.name"), nullable=False, index=True)
    )
    spec_json: str = _text()
    state: str
    health: str
    health_reason: str = _text()
    last_seq: int = Field(default=0, sa_column=Column(Integer, nullable=False, default=0))
    created_at: datetime = _when()
    updated_at: datetime = _when()


class _WorkloadRow(_Base, table=True):
    __tablename__ = "workloads"
    protection: str = Field(
        sa_column=Column(String, ForeignKey("protections.name", ondelete="CASCADE"), primary_key=True)
    )
    position: int = Field(primary_key=True)
    platform: str
    vm_id: str
    name: str
    data_json: str = _text()


class _CheckpointRow(_Base, table=True):
    __tablename__ = "checkpoints"
    protection: str = Field(
        sa_column=Column(String, ForeignKey("protections.name", ondelete="CASCADE"), primary_key=True)
    )
    disk: str = Field(primary_key=True)
    token: str = _text()
    point_id: str | None = None  # the point whose commit made it current
    updated_at: datetime = _when()
    data_json: str = _text()


class _DrRow(_Base, table=True):
    """What a failed-over protection needs for failback (api.FailoverRecord as JSON).
    A table of its own so catalogs made before it gain it by create_all."""

    __tablename__ = "dr_records"
    protection: str = Field(
        sa_column=Column(String, ForeignKey("protections.name", ondelete="CASCADE"), primary_key=True)
    )
    updated_at: datetime = _when()
    data_json: str = _text()


class _PointRow(_Base, table=True):
    __tablename__ = "recovery_points"
    __table_args__ = (UniqueConstraint("protection", "seq", name="uq_point_protection_seq"),)
    id: str = Field(primary_key=True)
    protection: str = Field(
        sa_column=Column(
            String, ForeignKey("protections.name", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    seq: int
    instant: datetime = _when()
    committed_at: datetime = _when()
    kind: str
    status: str  # "committed" | "deleting"
    data_json: str = _text()


class _ManifestRow(_Base, table=True):
    __tablename__ = "manifests"
    point_id: str = Field(
        sa_column=Column(String, ForeignKey("recovery_points.id", ondelete="CASCADE"), primary_key=True)
    )
    disk: str = Field(primary_key=True)
    size: int
    sha256: str
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class _StagedManifestRow(_Base, table=True):
    """A running cycle's manifest of one disk, from ``stream.disk`` (source site) to
    ``verify.sample`` and ``target.commit`` (target site), which may run on other
    hosts. Removed when the cycle commits or aborts. A table of its own so catalogs
    made before it gain it by create_all."""

    __tablename__ = "staged_manifests"
    protection: str = Field(
        sa_column=Column(String, ForeignKey("protections.name", ondelete="CASCADE"), primary_key=True)
    )
    cycle_id: str = Field(primary_key=True)
    disk: str = Field(primary_key=True)
    sha256: str
    updated_at: datetime = _when()
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class _CycleRow(_Base, table=True):
    __tablename__ = "cycles"
    cycle_id: str = Field(primary_key=True)
    protection: str = Field(
        sa_column=Column(
            String, ForeignKey("protections.name", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    started_at: datetime = _when(index=True)
    status: str
    point_id: str | None = None
    data_json: str = _text()


_TABLES = list(metadata.tables.values())  # only ours: the registry is private

_COMMITTED, _DELETING = "committed", "deleting"


# --------------------------------------------------------------------------- engine


def _make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() != "sqlite":
        return create_engine(u, pool_pre_ping=True)

    memory = u.database in (None, "", ":memory:")
    if not memory:
        Path(str(u.database)).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        u,
        connect_args={"check_same_thread": False, "timeout": 30},
        **({"poolclass": StaticPool} if memory else {}),
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from the sqlite3 module (it would BEGIN lazily, at the
        # first write, and a read-then-write transaction would then fail with "database is
        # locked" instead of waiting); see the "begin" hook below.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        if not memory:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front (waiting up to the busy timeout for it),
        # readers start a plain deferred transaction (WAL: they never block writers).
        immediate = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _retryable(e: Exception) -> bool:
    if isinstance(e, IntegrityError):
        return True  # a concurrent insert of the same key: run again, it takes the other path
    if isinstance(e, OperationalError):
        text = str(e.orig).lower()
        code = getattr(e.orig, "sqlstate", None)
        return "database is locked" in text or code in ("40001", "40P01")
    return False


# --------------------------------------------------------------------------- catalog


class Catalog:
    """Thread-safe; each method runs in its own session (and writes in one transaction)."""

    def __init__(self, url: str, box: SecretBox) -> None:
        self.url = url
        self.box = box
        self._engine = _make_engine(url)
        self._write_engine = self._engine.execution_options(**{_WRITE: True})
        self._create_schema()

    @classmethod
    def from_settings(cls, s: Settings | None = None) -> Catalog:
        s = s or default_settings()
        s.home.mkdir(parents=True, exist_ok=True)
        key_file = Path(s.secret_key_file) if s.secret_key_file else s.keys_dir / "catalog.key"
        return cls(s.effective_catalog_url, SecretBox.from_key_file(key_file))

    def close(self) -> None:
        self._engine.dispose()

    def __repr__(self) -> str:
        return f"Catalog({make_url(self.url).render_as_string(hide_password=True)!r})"

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    # ------------------------------------------------------------------ plumbing

    def _create_schema(self) -> None:
        with self._write_engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # serialise concurrent first starts (workers and CLI at once)
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7433630153)")
            metadata.create_all(conn, tables=_TABLES)
            row = conn.execute(select(_MetaRow.value).where(_MetaRow.key == "schema_version")).first()
            if row is None:
                conn.execute(
                    _MetaRow.__table__.insert().values(  # type: ignore[attr-defined]
                        key="schema_version", value=str(SCHEMA_VERSION)
                    )
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise CatalogError(
                    f"the catalog {self!r} has schema version {row[0]}, newer than this "
                    f"transcend understands ({SCHEMA_VERSION}); upgrade transcend"
                )

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self._engine) as s:
            yield s

    def _write(self, fn: Callable[[Session], _T], attempts: int = 4) -> _T:
        """Run ``fn`` in one transaction, again when it lost a race with another writer."""
        for attempt in range(attempts):
            try:
                with Session(self._write_engine, expire_on_commit=False) as s, s.begin():
                    return fn(s)
            except (IntegrityError, OperationalError) as e:
                if attempt == attempts - 1 or not _retryable(e):
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _protection_row(self, s: Session, name: str) -> _ProtectionRow:
        row = s.get(_ProtectionRow, name)
        if row is None:
            known = s.exec(select(_ProtectionRow.name).order_by(_ProtectionRow.name)).all()
            raise NotFoundError("protection", name, list(known), hint="create it with `transcend protect`")
        return row

    def _platform_row(self, s: Session, name: str) -> _PlatformRow:
        row = s.get(_PlatformRow, name)
        if row is None:
            known = s.exec(select(_PlatformRow.name).order_by(_PlatformRow.name)).all()
            raise NotFoundError("platform", name, list(known), hint="add it with `transcend platform add`")
        return row

    def _point_row(self, s: Session, point_id: str) -> _PointRow:
        row = s.get(_PointRow, point_id)
        if row is None:
            raise NotFoundError(
                "recovery point", point_id, hint="list them with `transcend points PROTECTION`"
            )
        return row

    # ------------------------------------------------------------------ platforms

    @staticmethod
    def _platform_info(row: _PlatformRow) -> PlatformInfo:
        return PlatformInfo(
            name=row.name,
            kind=row.kind,
            site=row.site,
            config=json.loads(row.config_json),
        )

    def add_platform(self, spec: PlatformSpec, *, replace: bool = False) -> PlatformInfo:
        secret = self.box.encrypt(dict(spec.secret))
        config = json.dumps(spec.config, sort_keys=True)

        def fn(s: Session) -> PlatformInfo:
            now = _now()
            row = s.get(_PlatformRow, spec.name)
            if row is None:
                row = _PlatformRow(
                    name=spec.name,
                    kind=str(spec.kind),
                    site=spec.site,
                    config_json=config,
                    secret_enc=secret,
                    created_at=now,
                    updated_at=now,
                )
            elif not replace:
                raise AlreadyExists(
                    "platform", spec.name, hint="pass replace=True (`--replace`) to update it"
                )
            else:
                row.kind, row.site, row.config_json = str(spec.kind), spec.site, config
                row.secret_enc, row.updated_at = secret, now
            s.add(row)
            s.flush()
            return self._platform_info(row)

        return self._write(fn)

    def get_platform(self, name: str) -> PlatformInfo:
        with self._read() as s:
            return self._platform_info(self._platform_row(s, name))

    def platform_secret(self, name: str) -> dict[str, str]:
        with self._read() as s:
            token = self._platform_row(s, name).secret_enc
        try:
            return {str(k): str(v) for k, v in self.box.decrypt(token).items()}
        except SecretError as e:
            raise SecretError(f"credentials of platform {name!r}: {e}") from e

    def list_platforms(self) -> list[PlatformInfo]:
        with self._read() as s:
            rows = s.exec(select(_PlatformRow).order_by(_PlatformRow.name)).all()
            return [self._platform_info(r) for r in rows]

    def remove_platform(self, name: str) -> None:
        def fn(s: Session) -> None:
            row = self._platform_row(s, name)
            users = s.exec(
                select(_ProtectionRow.name)
                .where((_ProtectionRow.source_platform == name) | (_ProtectionRow.target_platform == name))
                .order_by(_ProtectionRow.name)
            ).all()
            if users:
                raise InUse("platform", name, list(users), hint="remove those protections first")
            s.delete(row)

        self._write(fn)

    def reencrypt_secrets(self) -> int:
        """Re-encrypt every platform's credentials with the box's first key (key rotation,
        docs/catalog.md); returns how many were rewritten."""

        def fn(s: Session) -> int:
            rows = s.exec(select(_PlatformRow)).all()
            for row in rows:
                try:
                    row.secret_enc = self.box.rotate(row.secret_enc)
                except SecretError as e:
                    raise SecretError(f"credentials of platform {row.name!r}: {e}") from e
                s.add(row)
            return len(rows)

        return self._write(fn)

    # ------------------------------------------------------------------ protections

    @staticmethod
    def _record(row: _ProtectionRow, workloads: Sequence[_WorkloadRow]) -> ProtectionRecord:
        return ProtectionRecord(
            name=row.name,
            spec=ProtectionSpec.model_validate_json(row.spec_json),
            workloads=[
                Workload.model_validate_json(w.data_json) for w in sorted(workloads, key=lambda w: w.position)
            ],
            state=ProtectionState(row.state),
            health=Health(row.health),
            health_reason=row.health_reason,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    def _workload_rows(self, s: Session, name: str) -> Sequence[_WorkloadRow]:
        return s.exec(
            select(_WorkloadRow).where(_WorkloadRow.protection == name).order_by(col(_WorkloadRow.position))
        ).all()

    @staticmethod
    def _put_workloads(s: Session, name: str, workloads: list[Workload]) -> None:
        s.execute(delete(_WorkloadRow).where(col(_WorkloadRow.protection) == name))
        for i, w in enumerate(workloads):
            s.add(
                _WorkloadRow(
                    protection=name,
                    position=i,
                    platform=w.ref.platform,
                    vm_id=w.ref.id,
                    name=w.name,
                    data_json=w.model_dump_json(),
                )
            )

    def add_protection(self, spec: ProtectionSpec, workloads: list[Workload]) -> ProtectionRecord:
        def fn(s: Session) -> ProtectionRecord:
            if s.get(_ProtectionRow, spec.name) is not None:
                raise AlreadyExists("protection", spec.name, hint="choose another name or remove it first")
            self._platform_row(s, spec.source_platform)
            self._platform_row(s, spec.target_platform)
            now = _now()
            row = _ProtectionRow(
                name=spec.name,
                source_platform=spec.source_platform,
                target_platform=spec.target_platform,
                spec_json=spec.model_dump_json(),
                state=ProtectionState.PREPARING.value,
                health=Health.HEALTHY.value,
                health_reason="",
                last_seq=0,
                created_at=now,
                updated_at=now,
            )
            s.add(row)
            s.flush()
            self._put_workloads(s, spec.name, workloads)
            s.flush()
            return self._record(row, self._workload_rows(s, spec.name))

        return self._write(fn)

    def get_protection(self, name: str) -> ProtectionRecord:
        with self._read() as s:
            row = self._protection_row(s, name)
            return self._record(row, self._workload_rows(s, name))

    def list_protections(self) -> list[ProtectionRecord]:
        with self._read() as s:
            rows = s.exec(select(_ProtectionRow).order_by(_ProtectionRow.name)).all()
            by_protection: dict[str, list[_WorkloadRow]] = {}
            for w in s.exec(select(_WorkloadRow)).all():
                by_protection.setdefault(w.protection, []).append(w)
            return [self._record(r, by_protection.get(r.name, [])) for r in rows]

    def _update_protection(
        self, name: str, change: Callable[[Session, _ProtectionRow], None]
    ) -> ProtectionRecord:
        def fn(s: Session) -> ProtectionRecord:
            row = self._protection_row(s, name)
            change(s, row)
            row.updated_at = _now()
            s.add(row)
            s.flush()
            return self._record(row, self._workload_rows(s, name))

        return self._write(fn)

    def set_protection_state(
        self,
        name: str,
        state: ProtectionState,
        *,
        health: Health | None = None,
        reason: str | None = None,
    ) -> ProtectionRecord:
        """``health=None`` keeps the health; a new health without ``reason`` clears the
        reason; ``reason`` alone replaces the reason."""
        state = ProtectionState(state)
        health = None if health is None else Health(health)

        def change(_s: Session, row: _ProtectionRow) -> None:
            row.state = state.value
            if health is not None:
                row.health = health.value
                row.health_reason = reason or ""
            elif reason is not None:
                row.health_reason = reason

        return self._update_protection(name, change)

    def transition(self, name: str, allowed: Sequence[ProtectionState], to: ProtectionState,
                   operation: str, hint: str = "") -> ProtectionState:
        """Compare-and-set of the state (the lock of DR operations): move to ``to`` only
        from one of ``allowed`` or from ``to`` itself (a retry); returns the state before.
        Raises WrongState and changes nothing otherwise."""
        before: list[ProtectionState] = []

        def change(_s: Session, row: _ProtectionRow) -> None:
            current = ProtectionState(row.state)
            before.append(current)
            if current != to and current not in allowed:
                raise WrongState(name, current.value, operation, hint)
            row.state = ProtectionState(to).value

        self._update_protection(name, change)
        return before[0]

    def get_dr_record(self, protection: str) -> str | None:
        """The JSON of the protection's failover record, if it is failed over."""
        with self._read() as s:
            self._protection_row(s, protection)
            row = s.get(_DrRow, protection)
            return row.data_json if row is not None else None

    def put_dr_record(self, protection: str, data_json: str,
                      state: ProtectionState | None = None) -> None:
        """Store the record (and the new state, in the same transaction)."""

        def fn(s: Session) -> None:
            prow = self._protection_row(s, protection)
            row = s.get(_DrRow, protection) or _DrRow(protection=protection, data_json="")
            row.data_json, row.updated_at = data_json, _now()
            s.add(row)
            if state is not None:
                prow.state, prow.updated_at = ProtectionState(state).value, _now()
                s.add(prow)
            s.flush()

        self._write(fn)

    def clear_dr_record(self, protection: str, state: ProtectionState | None = None) -> None:
        def fn(s: Session) -> None:
            prow = self._protection_row(s, protection)
            s.execute(delete(_DrRow).where(col(_DrRow.protection) == protection))
            if state is not None:
                prow.state, prow.updated_at = ProtectionState(state).value, _now()
                s.add(prow)
            s.flush()

        self._write(fn)

    def update_policy(self, name: str, policy: ProtectionPolicy) -> ProtectionRecord:
        policy = ProtectionPolicy.model_validate(policy.model_dump())

        def change(_s: Session, row: _ProtectionRow) -> None:
            spec = ProtectionSpec.model_validate_json(row.spec_json)
            spec.policy = policy
            row.spec_json = spec.model_dump_json()

        return self._update_protection(name, change)

    def update_workloads(self, name: str, workloads: list[Workload]) -> None:
        def change(s: Session, row: _ProtectionRow) -> None:
            self._put_workloads(s, name, workloads)

        self._update_protection(name, change)

    def remove_protection(self, name: str) -> None:
        """Delete the protection with its workloads, points, manifests, checkpoints and
        cycles. The target's data is the caller's to delete first."""

        def fn(s: Session) -> None:
            row = self._protection_row(s, name)
            point_ids = select(_PointRow.id).where(_PointRow.protection == name)
            s.execute(delete(_ManifestRow).where(col(_ManifestRow.point_id).in_(point_ids)))
            s.execute(delete(_PointRow).where(col(_PointRow.protection) == name))
            s.execute(delete(_CheckpointRow).where(col(_CheckpointRow.protection) == name))
            s.execute(delete(_WorkloadRow).where(col(_WorkloadRow.protection) == name))
            s.execute(delete(_CycleRow).where(col(_CycleRow.protection) == name))
            s.execute(delete(_DrRow).where(col(_DrRow.protection) == name))
            s.execute(delete(_StagedManifestRow).where(col(_StagedManifestRow.protection) == name))
            s.delete(row)

        self._write(fn)

    # ------------------------------------------------------------------ checkpoints

    def checkpoints(self, protection: str) -> dict[str, Checkpoint]:
        with self._read() as s:
            self._protection_row(s, protection)
            rows = s.exec(
                select(_CheckpointRow)
                .where(_CheckpointRow.protection == protection)
                .order_by(_CheckpointRow.disk)
            ).all()
            return {r.disk: _normal_checkpoint(Checkpoint.model_validate_json(r.data_json)) for r in rows}

    def clear_checkpoints(self, protection: str) -> None:
        def fn(s: Session) -> None:
            self._protection_row(s, protection)
            s.execute(delete(_CheckpointRow).where(col(_CheckpointRow.protection) == protection))

        self._write(fn)

    def _put_checkpoint(self, s: Session, protection: str, cp: Checkpoint, point_id: str | None) -> None:
        row = s.get(_CheckpointRow, (protection, cp.disk))
        if row is None:
            row = _CheckpointRow(protection=protection, disk=cp.disk, token="", data_json="")
        row.token, row.point_id = cp.token, point_id
        row.updated_at, row.data_json = _now(), cp.model_dump_json()
        s.add(row)
        s.flush()

    # ------------------------------------------------------------------ recovery points

    @staticmethod
    def _point(row: _PointRow) -> RecoveryPoint:
        return Catalog._normal_point(RecoveryPoint.model_validate_json(row.data_json))

    @staticmethod
    def _normal_point(p: RecoveryPoint) -> RecoveryPoint:
        return p.model_copy(
            update={"instant": utc(p.instant), "committed_at": utc(p.committed_at)}, deep=True
        )

    def next_seq(self, protection: str) -> int:
        """One more than the highest sequence number ever committed (deleted points'
        numbers are never reused)."""
        with self._read() as s:
            row = self._protection_row(s, protection)
            top = s.exec(select(func.max(_PointRow.seq)).where(_PointRow.protection == protection)).one()
            return max(row.last_seq, top or 0) + 1

    def commit_point(
        self, point: RecoveryPoint, manifests: dict[str, bytes], checkpoints: list[Checkpoint]
    ) -> RecoveryPoint:
        """In one transaction: insert the point and its per-disk manifests, and replace the
        protection's checkpoints of those disks. Idempotent by ``point.id``: when the point
        is already there, the stored one is returned and nothing is changed.

        ``PointDisk.manifest_sha256`` is filled in from the manifest when left empty."""
        point = self._normal_point(point)
        disks = {d.disk for d in point.disks}
        if len(disks) != len(point.disks):
            raise CatalogError(f"recovery point {point.id!r} lists a disk twice")
        unknown = sorted(set(manifests) - disks)
        if unknown:
            raise CatalogError(
                f"recovery point {point.id!r}: manifests given for disks {unknown} "
                f"that the point does not have ({sorted(disks)})"
            )
        cp_disks = [c.disk for c in checkpoints]
        if len(set(cp_disks)) != len(cp_disks):
            raise CatalogError(
                f"recovery point {point.id!r}: two checkpoints for the same disk in {cp_disks}"
            )
        cps = [_normal_checkpoint(c) for c in checkpoints]
        digests = {d: hashlib.sha256(blob).hexdigest() for d, blob in manifests.items()}
        for d in point.disks:
            if not d.manifest_sha256 and d.disk in digests:
                d.manifest_sha256 = digests[d.disk]

        def fn(s: Session) -> RecoveryPoint:
            existing = s.get(_PointRow, point.id)
            if existing is not None:
                if existing.protection != point.protection:
                    raise AlreadyExists(
                        "recovery point",
                        point.id,
                        hint=f"it belongs to protection {existing.protection!r}",
                    )
                return self._point(existing)
            prot = self._protection_row(s, point.protection)
            clash = s.exec(
                select(_PointRow.id).where(
                    _PointRow.protection == point.protection, _PointRow.seq == point.seq
                )
            ).first()
            if clash is not None:
                raise AlreadyExists(
                    "recovery point",
                    f"{point.protection} #{point.seq}",
                    hint=f"sequence number taken by {clash!r}; use next_seq()",
                )
            row = _PointRow(
                id=point.id,
                protection=point.protection,
                seq=point.seq,
                instant=point.instant,
                committed_at=point.committed_at,
                kind=point.kind.value,
                status=_COMMITTED,
                data_json=point.model_dump_json(),
            )
            s.add(row)
            s.flush()
            for disk, blob in manifests.items():
                s.add(
                    _ManifestRow(
                        point_id=point.id,
                        disk=disk,
                        size=len(blob),
                        sha256=digests[disk],
                        data=bytes(blob),
                    )
                )
            s.flush()
            for cp in cps:
                self._put_checkpoint(s, point.protection, cp, point.id)
            prot.last_seq = max(prot.last_seq, point.seq)
            s.add(prot)
            s.flush()
            return self._point(row)

        return self._write(fn)

    def points(self, protection: str, *, include_deleting: bool = False) -> list[RecoveryPoint]:
        with self._read() as s:
            self._protection_row(s, protection)
            q = select(_PointRow).where(_PointRow.protection == protection)
            if not include_deleting:
                q = q.where(_PointRow.status == _COMMITTED)
            return [self._point(r) for r in s.exec(q.order_by(col(_PointRow.seq))).all()]

    def get_point(self, point_id: str) -> RecoveryPoint:
        with self._read() as s:
            return self._point(self._point_row(s, point_id))

    def latest_point(self, protection: str) -> RecoveryPoint | None:
        with self._read() as s:
            self._protection_row(s, protection)
            row = s.exec(
                select(_PointRow)
                .where(_PointRow.protection == protection, _PointRow.status == _COMMITTED)
                .order_by(col(_PointRow.seq).desc())
                .limit(1)
            ).first()
            return None if row is None else self._point(row)

    def manifest(self, point_id: str, disk: str) -> bytes:
        with self._read() as s:
            row = s.get(_ManifestRow, (point_id, disk))
            if row is None:
                self._point_row(s, point_id)
                known = s.exec(
                    select(_ManifestRow.disk)
                    .where(_ManifestRow.point_id == point_id)
                    .order_by(_ManifestRow.disk)
                ).all()
                raise NotFoundError(f"manifest of recovery point {point_id!r} for disk", disk, list(known))
            data = bytes(row.data)
            if hashlib.sha256(data).hexdigest() != row.sha256:
                raise CatalogError(
                    f"manifest of recovery point {point_id!r} disk {disk!r} is damaged in the "
                    "catalog (checksum mismatch); restore the catalog from a backup"
                )
            return data

    # ------------------------------------------------------------------ staged manifests

    def stage_manifest(self, protection: str, cycle_id: str, disk: str, data: bytes) -> None:
        """Store (or replace: a retried stream) the manifest a cycle's copy of ``disk``
        produced, for the target site's verify and commit."""
        digest = hashlib.sha256(data).hexdigest()

        def fn(s: Session) -> None:
            self._protection_row(s, protection)
            row = s.get(_StagedManifestRow, (protection, cycle_id, disk))
            if row is None:
                row = _StagedManifestRow(protection=protection, cycle_id=cycle_id, disk=disk,
                                         sha256=digest, updated_at=_now(), data=bytes(data))
            else:
                row.sha256, row.updated_at, row.data = digest, _now(), bytes(data)
            s.add(row)

        self._write(fn)

    def staged_manifest(self, protection: str, cycle_id: str, disk: str) -> bytes:
        with self._read() as s:
            row = s.get(_StagedManifestRow, (protection, cycle_id, disk))
            if row is None:
                raise NotFoundError(f"manifest of running cycle {cycle_id!r} for disk", disk,
                                    hint="the copy of that disk has not finished")
            data = bytes(row.data)
        if hashlib.sha256(data).hexdigest() != row.sha256:
            raise CatalogError(f"staged manifest of cycle {cycle_id!r} disk {disk!r} is damaged "
                               "in the catalog (checksum mismatch); run the cycle again")
        return data

    # A pull transfer's change set (transcend/pullexport.py) travels the same way, from
    # the source site's freeze to the target site's streams; its key cannot be a disk id.
    _CHANGES = "changes/"

    def stage_changes(self, protection: str, cycle_id: str, disk: str, data: bytes) -> None:
        """Store the packed change set of ``disk`` for a stream at another site."""
        self.stage_manifest(protection, cycle_id, self._CHANGES + disk, data)

    def staged_changes(self, protection: str, cycle_id: str, disk: str) -> bytes:
        return self.staged_manifest(protection, cycle_id, self._CHANGES + disk)

    def drop_staged_manifests(self, protection: str, cycle_id: str) -> None:
        """Forget a cycle's staged manifests and change sets (after its commit or abort);
        idempotent."""

        def fn(s: Session) -> None:
            s.execute(delete(_StagedManifestRow).where(
                col(_StagedManifestRow.protection) == protection,
                col(_StagedManifestRow.cycle_id) == cycle_id))

        self._write(fn)

    def mark_deleting(self, point_id: str) -> None:
        """Hide the point from ``points()``; retention deletes its data, then calls
        ``finish_delete``. Idempotent."""

        def fn(s: Session) -> None:
            row = self._point_row(s, point_id)
            row.status = _DELETING
            s.add(row)

        self._write(fn)

    def finish_delete(self, point_id: str) -> None:
        """Remove the point's row and manifests; idempotent (a missing point is fine)."""

        def fn(s: Session) -> None:
            s.execute(delete(_ManifestRow).where(col(_ManifestRow.point_id) == point_id))
            s.execute(delete(_PointRow).where(col(_PointRow.id) == point_id))

        self._write(fn)

    def deleting_points(self, protection: str) -> list[RecoveryPoint]:
        with self._read() as s:
            self._protection_row(s, protection)
            rows = s.exec(
                select(_PointRow)
                .where(_PointRow.protection == protection, _PointRow.status == _DELETING)
                .order_by(col(_PointRow.seq))
            ).all()
            return [self._point(r) for r in rows]

    def update_point(self, point: RecoveryPoint) -> None:
        """Replace a point's description (e.g. its disks' locations after a merge); its
        id, protection and sequence number cannot change."""
        point = self._normal_point(point)

        def fn(s: Session) -> None:
            row = self._point_row(s, point.id)
            if (row.protection, row.seq) != (point.protection, point.seq):
                raise CatalogError(
                    f"recovery point {point.id!r} is #{row.seq} of protection "
                    f"{row.protection!r}; update_point cannot change that"
                )
            row.instant, row.committed_at = point.instant, point.committed_at
            row.kind, row.data_json = point.kind.value, point.model_dump_json()
            s.add(row)

        self._write(fn)

    # ------------------------------------------------------------------ cycles

    def record_cycle(self, c: CycleRecord) -> None:
        """Insert or update (by ``cycle_id``) one cycle's record."""
        c = CycleRecord.model_validate(c.model_dump())

        def fn(s: Session) -> None:
            self._protection_row(s, c.protection)
            row = s.get(_CycleRow, c.cycle_id)
            if row is None:
                row = _CycleRow(
                    cycle_id=c.cycle_id,
                    protection=c.protection,
                    started_at=c.started_at,
                    status=c.status,
                    data_json="",
                )
            elif row.protection != c.protection:
                raise AlreadyExists("cycle", c.cycle_id, hint=f"it belongs to protection {row.protection!r}")
            row.started_at, row.status, row.point_id = c.started_at, c.status, c.point_id
            row.data_json = c.model_dump_json()
            s.add(row)

        self._write(fn)

    def cycles(
        self, protection: str, *, since: datetime | None = None, limit: int = 1000
    ) -> list[CycleRecord]:
        """The most recent ``limit`` cycles started at or after ``since``, oldest first."""
        with self._read() as s:
            self._protection_row(s, protection)
            q = select(_CycleRow).where(_CycleRow.protection == protection)
            if since is not None:
                q = q.where(_CycleRow.started_at >= utc(since))
            q = q.order_by(col(_CycleRow.started_at).desc(), col(_CycleRow.cycle_id).desc())
            rows = s.exec(q.limit(max(0, limit))).all()
            return [CycleRecord.model_validate_json(r.data_json) for r in reversed(rows)]
