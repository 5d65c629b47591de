"""`SqlRolloutStore`: rollouts, waves, members and timeline in the fleet's SQL database (SQLite or
PostgreSQL), through SQLAlchemy Core.

Its tables are new ones only, made with `create_all` when the store opens (an older database gains them
and keeps every record; nothing else changes shape); a column added later is added to an existing table by
`schema.set_up_schema`'s migrations. Telemetry, the gates' samples, is read from the
fleet store's `telemetry` table. `MemoryFleetStore` uses this same code on a private in-memory SQLite
database, with telemetry read from its own memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from edgefleet.errors import ConflictError, NotFoundError, TransportError
from edgefleet.server.storage import rows
from edgefleet.server.storage import schema as fleet_tables
from edgefleet.server.storage.rollout_records import (
    MemberRecord,
    RolloutRecord,
    RolloutStore,
    TimelineEntry,
    WaveRecord,
)
from edgefleet.values import TelemetryReport

_BATCH = 500

meta = sa.MetaData()
rollouts = sa.Table(
    "rollouts",
    meta,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("model_name", sa.String(128), nullable=False),
    sa.Column("version", sa.String(128), nullable=False),
    sa.Column("selector", sa.String(256), nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("actor", sa.String(256), nullable=False),
    sa.Column("settings_json", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("current_wave", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
    sa.Column("finished_ms", sa.BigInteger, nullable=False),
    sa.Column("rollback_id", sa.String(64), nullable=False),
)
waves = sa.Table(
    "rollout_waves",
    meta,
    sa.Column("rollout_id", sa.String(64), primary_key=True),
    sa.Column("index", sa.Integer, primary_key=True),
    sa.Column("shadow", sa.Boolean, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("deployment_id", sa.String(64), nullable=False),
    sa.Column("started_ms", sa.BigInteger, nullable=False),
    sa.Column("judged_ms", sa.BigInteger, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("judgement_json", sa.Text, nullable=False),
)
members = sa.Table(
    "rollout_members",
    meta,
    sa.Column("rollout_id", sa.String(64), primary_key=True),
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("role", sa.String(16), primary_key=True),
    sa.Column("wave_index", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("target_path", sa.String(512), nullable=False),
    sa.Column("assigned_ms", sa.BigInteger, nullable=False),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
    sa.Column("healthy_ms", sa.BigInteger, nullable=False),
    sa.Column("retry_order", sa.String(96), nullable=False, server_default=""),  # schema version 4
)
timeline = sa.Table(
    "rollout_timeline",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("rollout_id", sa.String(64), nullable=False, index=True),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    sa.Column("what", sa.Text, nullable=False),
    sa.Column("details_json", sa.Text, nullable=False),
)

TelemetryReader = Callable[[Sequence[str], int], dict[str, list[TelemetryReport]]]


def _record(cls: Any, row: Any) -> Any:
    return cls(**{f.name: getattr(row, f.name) for f in dataclasses.fields(cls)})


class SqlRolloutStore(RolloutStore):
    def __init__(self, engine: sa.Engine, telemetry_reader: TelemetryReader | None = None):
        self.engine = engine
        self._reader = telemetry_reader
        # A private in-memory database is one connection: one caller at a time.
        self._lock = threading.Lock() if telemetry_reader is not None else contextlib.nullcontext()
        with self._tx() as conn:
            meta.create_all(conn)

    @classmethod
    def in_memory(cls, telemetry_reader: TelemetryReader) -> SqlRolloutStore:
        engine = sa.create_engine(
            "sqlite://", poolclass=sa.pool.StaticPool, connect_args={"check_same_thread": False}
        )
        return cls(engine, telemetry_reader)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sa.Connection]:
        with self._lock:
            try:
                with self.engine.begin() as conn:
                    yield conn
            except OperationalError as e:
                raise TransportError(f"database unavailable: {e.orig}") from e

    def add_rollout(
        self,
        rollout: RolloutRecord,
        wave_records: Sequence[WaveRecord],
        member_records: Sequence[MemberRecord],
    ) -> None:
        try:
            with self._tx() as conn:
                conn.execute(rollouts.insert().values(**dataclasses.asdict(rollout)))
                if wave_records:
                    conn.execute(waves.insert(), [dataclasses.asdict(w) for w in wave_records])
                for i in range(0, len(member_records), _BATCH):
                    chunk = member_records[i : i + _BATCH]
                    conn.execute(members.insert(), [dataclasses.asdict(m) for m in chunk])
        except IntegrityError:
            raise ConflictError(f"a rollout {rollout.id!r} exists already; propose another id") from None

    def get_rollout(self, rollout_id: str) -> RolloutRecord:
        with self._tx() as conn:
            row = conn.execute(sa.select(rollouts).where(rollouts.c.id == rollout_id)).first()
        if row is None:
            raise NotFoundError(f"no rollout {rollout_id!r}; `edgefleet rollout list` shows them")
        return _record(RolloutRecord, row)

    def list_rollouts(self) -> list[RolloutRecord]:
        with self._tx() as conn:
            found = conn.execute(sa.select(rollouts).order_by(rollouts.c.created_ms, rollouts.c.id)).all()
        return [_record(RolloutRecord, r) for r in found]

    def update_rollout(self, rollout_id: str, **values: Any) -> None:
        with self._tx() as conn:
            conn.execute(rollouts.update().where(rollouts.c.id == rollout_id).values(**values))

    def waves(self, rollout_id: str) -> list[WaveRecord]:
        query = sa.select(waves).where(waves.c.rollout_id == rollout_id).order_by(waves.c.index)
        with self._tx() as conn:
            return [_record(WaveRecord, r) for r in conn.execute(query).all()]

    def update_wave(self, rollout_id: str, index: int, **values: Any) -> None:
        with self._tx() as conn:
            conn.execute(
                waves.update()
                .where(waves.c.rollout_id == rollout_id, waves.c.index == index)
                .values(**values)
            )

    def members(self, rollout_id: str) -> list[MemberRecord]:
        query = sa.select(members).where(members.c.rollout_id == rollout_id)
        with self._tx() as conn:
            return [_record(MemberRecord, r) for r in conn.execute(query).all()]

    def add_members(self, member_records: Sequence[MemberRecord]) -> None:
        with self._tx() as conn:
            for m in member_records:
                there = conn.execute(
                    sa.select(members.c.device_id).where(
                        members.c.rollout_id == m.rollout_id,
                        members.c.device_id == m.device_id,
                        members.c.role == m.role,
                    )
                ).first()
                if there is None:
                    conn.execute(members.insert().values(**dataclasses.asdict(m)))

    def update_members(self, rollout_id: str, changes: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        if not changes:
            return
        with self._tx() as conn:
            for device_id, role, values in changes:
                conn.execute(
                    members.update()
                    .where(
                        members.c.rollout_id == rollout_id,
                        members.c.device_id == device_id,
                        members.c.role == role,
                    )
                    .values(**values)
                )

    def add_timeline(self, entries: Sequence[TimelineEntry]) -> None:
        if entries:
            with self._tx() as conn:
                conn.execute(timeline.insert(), [dataclasses.asdict(e) for e in entries])

    def timeline(self, rollout_id: str) -> list[TimelineEntry]:
        query = sa.select(timeline).where(timeline.c.rollout_id == rollout_id).order_by(timeline.c.id)
        with self._tx() as conn:
            return [_record(TimelineEntry, r) for r in conn.execute(query).all()]

    def telemetry_since(self, device_ids: Sequence[str], since_ms: int) -> dict[str, list[TelemetryReport]]:
        if self._reader is not None:
            return self._reader(device_ids, since_ms)
        m = fleet_tables.telemetry.c
        found: dict[str, list[TelemetryReport]] = {}
        ids = list(device_ids)
        with self._tx() as conn:
            for i in range(0, len(ids), _BATCH):
                query = (
                    sa.select(m.device_id, m.at_ms, m.report)
                    .where(m.device_id.in_(ids[i : i + _BATCH]), m.at_ms >= since_ms)
                    .order_by(m.id)
                )
                for r in conn.execute(query):
                    found.setdefault(r.device_id, []).append(rows.telemetry_from_json(r.at_ms, r.report))
        return found
