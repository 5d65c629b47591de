"""`SqlFleetStore`: the records in SQLite (the embedded default) or PostgreSQL (a database server of its
own), through one SQLAlchemy Core code path. One fleet server per database: its rollout engine, and the
locks that order a deploy against a rollout start, live in its process.
The tables and their migrations are in `schema.py`.

Rows become records in `rows.py`, the one place typed values meet JSON columns.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from edgefleet.audit_chain import AuditEntry
from edgefleet.errors import ConflictError, NotFoundError, TransportError
from edgefleet.selectors import Selector
from edgefleet.server.storage import rows, sql_audit, sql_labels
from edgefleet.server.storage import schema as t
from edgefleet.server.storage.interfaces import FleetStore
from edgefleet.server.storage.records import (
    AuditPage,
    Deployment,
    DeploymentCounts,
    DeviceRecord,
    EnrollmentToken,
    EventRecord,
    ModelRecord,
    RepoVersions,
)
from edgefleet.server.storage.rollout_records import RolloutStore
from edgefleet.values import Capabilities, ModelRef, TelemetryReport

_BATCH = 500  # ids per `IN (...)`: well under any database's parameter limit


def token_hash(token: str) -> str:
    # Tokens are 256-bit random values: a plain hash is enough to keep them unusable if the DB leaks.
    return hashlib.sha256(token.encode()).hexdigest()


def sqlalchemy_url(url: str) -> str:
    """The URL SQLAlchemy needs: `postgresql://` means the psycopg 3 driver, the one edgefleet installs."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def _safe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return sa.engine.make_url(url).render_as_string(hide_password=True)


class SqlFleetStore(FleetStore):
    """SQLite or PostgreSQL through SQLAlchemy Core."""

    def __init__(self, url: str):
        self.url = url
        self._rollouts: RolloutStore | None = None
        if url.startswith("sqlite"):
            # How long a write waits for SQLite's lock before the call fails with UNAVAILABLE (retryable).
            busy_timeout = {} if "timeout=" in url else {"timeout": 15}
            self.engine = sa.create_engine(url, connect_args=busy_timeout)

            @sa.event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
                cur.execute("PRAGMA synchronous=FULL")  # an acknowledged write survives power loss
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()
        else:
            self.engine = sa.create_engine(
                sqlalchemy_url(url), pool_pre_ping=True, pool_size=10, max_overflow=10
            )
        try:
            with self._tx() as conn:
                t.set_up_schema(conn, _safe_url(url))
        except BaseException:
            self.engine.dispose()
            raise

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sa.Connection]:
        """One transaction; a busy or unreachable database becomes TransportError (UNAVAILABLE, retry)."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except OperationalError as e:
            raise TransportError(f"database unavailable: {e.orig}") from e

    def close(self) -> None:
        self.engine.dispose()

    def rollouts(self) -> RolloutStore:
        if self._rollouts is None:
            from edgefleet.server.storage.rollout_sql import SqlRolloutStore

            self._rollouts = SqlRolloutStore(self.engine)
        return self._rollouts

    # ---- enrollment --------------------------------------------------------------------------------------

    def add_enrollment_token(
        self, token: str, group: str, uses: int, expires_ms: int, labels: Mapping[str, str] | None = None
    ) -> None:
        with self._tx() as conn:
            conn.execute(
                t.tokens.insert().values(
                    token_hash=token_hash(token),
                    group_name=group,
                    uses_left=uses,
                    expires_ms=expires_ms,
                    labels=dict(labels or {}),
                )
            )

    def enrollment_token(self, token: str) -> EnrollmentToken | None:
        with self._tx() as conn:
            row = conn.execute(sa.select(t.tokens).where(t.tokens.c.token_hash == token_hash(token))).first()
        if row is None:
            return None
        return EnrollmentToken(row.group_name, row.uses_left, row.expires_ms, dict(row.labels or {}))

    def enroll_device(self, token: str, now_ms: int, device: DeviceRecord, credential: str) -> bool:
        with self._tx() as conn:
            # The guard in the WHERE clause makes the use and its check one step.
            took = conn.execute(
                t.tokens.update()
                .where(
                    t.tokens.c.token_hash == token_hash(token),
                    t.tokens.c.uses_left > 0,
                    t.tokens.c.expires_ms >= now_ms,
                )
                .values(uses_left=t.tokens.c.uses_left - 1)
            )
            if took.rowcount != 1:
                return False
            conn.execute(
                t.devices.insert().values(**rows.device_values(device), token_hash=token_hash(credential))
            )
            sql_labels.insert(conn, device.id, device.labels)
        return True

    # ---- devices -----------------------------------------------------------------------------------------

    def device_for_token(self, credential: str) -> DeviceRecord | None:
        found = self._devices(t.devices.c.token_hash == token_hash(credential))
        return found[0] if found else None

    def get_device(self, device_id: str) -> DeviceRecord:
        found = self._devices(t.devices.c.id == device_id)
        if not found:
            raise NotFoundError(f"no device {device_id!r}")
        return found[0]

    def list_devices(self) -> list[DeviceRecord]:
        return self._devices(sa.true())

    def devices_named(self, name: str) -> list[DeviceRecord]:
        return self._devices(t.devices.c.name == name, by_id=True)

    def devices_matching(self, selector: Selector) -> list[DeviceRecord]:
        where: list[sa.ColumnElement[bool]] = [sql_labels.condition(r) for r in selector.requirements]
        if selector.kind == "group":
            where.append(t.devices.c.group_name == selector.value)
        if selector.kind == "device":
            where.append(t.devices.c.id == selector.value)
        return self._devices(sa.and_(sa.true(), *where))

    def _devices(self, where: sa.ColumnElement[bool], by_id: bool = False) -> list[DeviceRecord]:
        """The devices `where` selects with their labels (a second query, in the same transaction)."""
        d = t.devices.c
        query = sa.select(t.devices).where(where).order_by(*((d.id,) if by_id else (d.name, d.id)))
        chosen = sa.select(d.id).where(where).scalar_subquery()
        label_query = sa.select(t.device_labels).where(t.device_labels.c.device_id.in_(chosen))
        with self._tx() as conn:
            found = list(conn.execute(query))
            labels: dict[str, dict[str, str]] = {}
            if found:
                for row in conn.execute(label_query):
                    labels.setdefault(row.device_id, {})[row.key] = row.value
        return [rows.to_device(r, labels.get(r.id, {})) for r in found]

    # ---- labels --------------------------------------------------------------------------------------------

    def replace_labels(self, device_id: str, labels: Mapping[str, str], expected: Mapping[str, str]) -> bool:
        labels_of = t.device_labels.c.device_id == device_id
        with self._tx() as conn:
            # A write first: it takes the write lock (SQLite) or the row lock (PostgreSQL) before the read
            # below, so two operators labelling one device cannot both pass the comparison.
            lock = t.devices.update().where(t.devices.c.id == device_id).values(name=t.devices.c.name)
            if conn.execute(lock).rowcount != 1:
                raise NotFoundError(f"no device {device_id!r}")
            stored = {r.key: r.value for r in conn.execute(sa.select(t.device_labels).where(labels_of))}
            if stored != dict(expected):
                return False
            conn.execute(t.device_labels.delete().where(labels_of))
            sql_labels.insert(conn, device_id, labels)
        return True

    def record_status(
        self,
        device_id: str,
        *,
        current: ModelRef | None,
        previous: ModelRef | None,
        capabilities: Capabilities,
        bad_targets: tuple[str, ...],
        sequence: int,
        clock_skew_ms: int,
        seen_ms: int,
    ) -> bool:
        with self._tx() as conn:
            stored = conn.execute(
                t.devices.update()
                .where(t.devices.c.id == device_id, t.devices.c.status_sequence < sequence)
                .values(
                    current=current.to_json() if current else None,
                    previous=previous.to_json() if previous else None,
                    capabilities=capabilities.to_json(),
                    bad_targets=list(bad_targets),
                    status_sequence=sequence,
                    clock_skew_ms=clock_skew_ms,
                    last_seen_ms=seen_ms,
                )
            )
        return stored.rowcount == 1

    def advance_sequence(self, device_id: str, sequence: int) -> bool:
        with self._tx() as conn:
            advanced = conn.execute(
                t.devices.update()
                .where(t.devices.c.id == device_id, t.devices.c.status_sequence < sequence)
                .values(status_sequence=sequence)
            )
        return advanced.rowcount == 1

    def record_stage(
        self, device_id: str, stage: str, reason: str, seen_ms: int, *, deployment: str | None = None
    ) -> bool:
        d = t.devices.c
        still = () if deployment is None else (d.desired_deployment == deployment,)
        seen = sa.case((d.last_seen_ms < seen_ms, seen_ms), else_=d.last_seen_ms)
        return self._update(device_id, *still, last_stage=stage, last_reason=reason, last_seen_ms=seen)

    def clear_rollback(self, device_id: str, command_id: str) -> bool:
        with self._tx() as conn:
            cleared = conn.execute(
                t.devices.update()
                .where(t.devices.c.id == device_id, t.devices.c.rollback_command == command_id)
                .values(rollback_command="")
            )
        return cleared.rowcount == 1

    def touch(self, device_id: str, seen_ms: int) -> None:
        self._update(device_id, last_seen_ms=seen_ms)

    def set_revoked(self, device_id: str) -> None:
        if not self._update(device_id, revoked=True):
            raise NotFoundError(f"no device {device_id!r}")

    def _update(self, device_id: str, *conditions: Any, **values: Any) -> bool:
        """Sets `values` on the device's row if it meets `conditions` too; False when no row changed."""
        update = t.devices.update().where(t.devices.c.id == device_id, *conditions)
        with self._tx() as conn:
            return conn.execute(update.values(**values)).rowcount == 1

    # ---- models and signed metadata ----------------------------------------------------------------------

    def add_model(self, record: ModelRecord) -> None:
        try:
            with self._tx() as conn:
                conn.execute(t.models.insert().values(**record.__dict__))
        except IntegrityError as e:
            raise ConflictError(f"model file {record.target_path} exists already") from e

    def get_model(self, target_path: str) -> ModelRecord:
        with self._tx() as conn:
            row = conn.execute(sa.select(t.models).where(t.models.c.target_path == target_path)).first()
        if row is None:
            raise NotFoundError(f"no model file {target_path!r}")
        return ModelRecord(**row._mapping)

    def list_models(self, name: str = "") -> list[ModelRecord]:
        m = t.models.c
        query = sa.select(t.models).order_by(m.name, m.created_ms, m.target_path)
        if name:
            query = query.where(m.name == name)
        with self._tx() as conn:
            return [ModelRecord(**r._mapping) for r in conn.execute(query)]

    def mark_signed(self, target_paths: list[str]) -> None:
        with self._tx() as conn:
            conn.execute(
                t.models.update().where(t.models.c.target_path.in_(target_paths)).values(signed=True)
            )

    def put_metadata(self, files: dict[str, bytes], versions: RepoVersions, expected: RepoVersions) -> None:
        r = t.repo.c
        with self._tx() as conn:
            moved = conn.execute(
                t.repo.update()
                .where(
                    r.id == 1,
                    r.root == expected.root,
                    r.targets == expected.targets,
                    r.snapshot == expected.snapshot,
                    r.timestamp == expected.timestamp,
                )
                .values(**versions.__dict__)
            )
            if moved.rowcount != 1:
                raise ConflictError("the stored metadata versions changed meanwhile")
            for name, content in files.items():
                conn.execute(t.metadata_files.delete().where(t.metadata_files.c.name == name))
                conn.execute(t.metadata_files.insert().values(name=name, content=content))

    def get_metadata(self, name: str) -> bytes:
        query = sa.select(t.metadata_files.c.content).where(t.metadata_files.c.name == name)
        with self._tx() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise NotFoundError(f"no metadata {name!r}")
        return bytes(row.content)

    def repo_versions(self) -> RepoVersions:
        with self._tx() as conn:
            row = conn.execute(sa.select(t.repo).where(t.repo.c.id == 1)).one()
        return RepoVersions(row.root, row.targets, row.snapshot, row.timestamp)

    # ---- deployments -------------------------------------------------------------------------------------

    def add_deployment(
        self, deployment: Deployment, device_targets: dict[str, str], rollback_command: str = ""
    ) -> None:
        d = t.devices.c
        with self._tx() as conn:
            conn.execute(t.deployments.insert().values({**deployment.__dict__, "devices_targeted": 0}))
            by_target: dict[str, list[str]] = {}
            for device_id, target in device_targets.items():
                by_target.setdefault(target, []).append(device_id)
            pointed = 0
            for target, device_ids in by_target.items():
                values = {
                    "desired_target": target,
                    "desired_deployment": deployment.id,
                    "rollback_command": rollback_command,
                }
                for i in range(0, len(device_ids), _BATCH):
                    batch = device_ids[i : i + _BATCH]
                    pointed += conn.execute(
                        t.devices.update().where(d.id.in_(batch)).values(**values)
                    ).rowcount
            conn.execute(
                t.deployments.update()
                .where(t.deployments.c.id == deployment.id)
                .values(devices_targeted=pointed)
            )

    def add_deployment_target(self, deployment_id: str, device_id: str, target: str) -> None:
        d = t.devices.c
        with self._tx() as conn:
            pointed = conn.execute(
                t.devices.update()
                .where(d.id == device_id, d.desired_deployment != deployment_id)
                # A newer order than any rollback the device had not obeyed (as a deployment's own rows), and
                # in the same write: what it reported for an earlier order says nothing about this one.
                .values(
                    desired_target=target,
                    desired_deployment=deployment_id,
                    rollback_command="",
                    last_stage="",
                    last_reason="",
                )
            )
            if pointed.rowcount:  # count each device once
                conn.execute(
                    t.deployments.update()
                    .where(t.deployments.c.id == deployment_id)
                    .values(devices_targeted=t.deployments.c.devices_targeted + 1)
                )

    def list_deployments(self) -> list[Deployment]:
        query = sa.select(t.deployments).order_by(t.deployments.c.created_ms, t.deployments.c.id)
        with self._tx() as conn:
            return [Deployment(**r._mapping) for r in conn.execute(query)]

    def deployment_counts(self) -> dict[str, DeploymentCounts]:
        d = t.devices.c
        with self._tx() as conn:
            refused = _desired_is_bad(conn.dialect.name)
            current_target = sa.func.coalesce(d.current["target_path"].as_string(), "")
            healthy = sa.and_(
                current_target == d.desired_target, d.last_stage.in_(("healthy", "rolled_back"))
            )
            failed = sa.or_(d.last_stage == "failed", refused)
            query = (
                sa.select(
                    d.desired_deployment,
                    sa.func.sum(sa.case((healthy, 1), else_=0)),
                    sa.func.sum(sa.case((healthy, 0), (failed, 1), else_=0)),
                    sa.func.count(),
                )
                .where(d.desired_deployment != "")
                .group_by(d.desired_deployment)
            )
            counted = conn.execute(query).all()
        return {
            deployment_id: DeploymentCounts(int(ok), int(bad), int(total) - int(ok) - int(bad))
            for deployment_id, ok, bad, total in counted
        }

    # ---- events and telemetry ----------------------------------------------------------------------------

    def add_event(self, event: EventRecord) -> None:
        with self._tx() as conn:
            conn.execute(t.events.insert().values(**event.__dict__))

    def list_events(
        self, device_id: str = "", limit: int = 100, deployment_id: str = ""
    ) -> list[EventRecord]:
        e = t.events.c
        query = sa.select(t.events).order_by(e.id.desc()).limit(limit)
        if device_id:
            query = query.where(e.device_id == device_id)
        if deployment_id:
            query = query.where(e.deployment_id == deployment_id)
        with self._tx() as conn:
            found = list(conn.execute(query))
        return [EventRecord(**{k: v for k, v in r._mapping.items() if k != "id"}) for r in reversed(found)]

    def add_telemetry(self, device_id: str, report: TelemetryReport) -> None:
        row = {"device_id": device_id, "at_ms": report.at_ms, "report": rows.telemetry_to_json(report)}
        with self._tx() as conn:
            conn.execute(t.telemetry.insert().values(**row))

    def list_telemetry(self, device_id: str, limit: int) -> list[TelemetryReport]:
        m = t.telemetry.c
        query = (
            sa.select(m.at_ms, m.report).where(m.device_id == device_id).order_by(m.id.desc()).limit(limit)
        )
        with self._tx() as conn:
            found = list(conn.execute(query))
        return [rows.telemetry_from_json(r.at_ms, r.report) for r in reversed(found)]

    # ---- the audit log: insert and list (sql_audit) --------------------------------------------------

    def add_audit(self, at_ms: int, actor: str, action: str, subject: str, details_json: str) -> AuditEntry:
        with self._tx() as conn:
            return sql_audit.append(conn, at_ms, actor, action, subject, details_json)

    def list_audit(self, since_ms: int, action: str, from_seq: int, limit: int) -> AuditPage:
        with self._tx() as conn:
            return sql_audit.page(conn, since_ms, action, from_seq, limit)


def _desired_is_bad(dialect: str) -> sa.ColumnElement[bool]:
    """SQL for "the device refused its desired target before" (it is in its JSON list `bad_targets`)."""
    if dialect == "postgresql":
        text = "(devices.bad_targets::jsonb @> jsonb_build_array(devices.desired_target))"
    else:
        text = "EXISTS (SELECT 1 FROM json_each(devices.bad_targets) WHERE json_each.value = devices.desired_target)"
    return sa.literal_column(text, type_=sa.Boolean)
