"""Where the server keeps its state: a `FleetStore` for records and a `BlobStore` for model files.

`open_store(url)` picks the implementation from a URL: `sqlite:///path/fleet.db` (the embedded default) or
`postgresql://...` (several servers, one database). Both go through the same SQLAlchemy Core code. The
store is synchronous; the async services call it through `asyncio.to_thread`.

Blobs are content-addressed by sha256 and written durably (temp file, fsync, rename), so a crash during an
upload leaves no half file under a real name.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from edgefleet.durable import commit_file
from edgefleet.errors import (
    ConflictError,
    EdgefleetError,
    HashMismatchError,
    InvalidRequestError,
    NotFoundError,
    TransportError,
)

# Raise it with every change to the tables below, and add the step that brings an older database up to it
# (`_migrate_to_2`): a server migrates an older database when it starts and refuses a newer one, instead of
# failing later on a missing column.
SCHEMA_VERSION = 2


class SchemaMismatchError(EdgefleetError):
    """The database was made by a newer edgefleet, with tables this one does not know."""


def now_ms() -> int:
    return int(time.time() * 1000)


def token_hash(token: str) -> str:
    # Tokens are 256-bit random values: a plain hash is enough to keep them unusable if the DB leaks.
    return hashlib.sha256(token.encode()).hexdigest()


# ---- records -------------------------------------------------------------------------------------------


@dataclass
class ModelRecord:
    target_path: str
    name: str
    version: str
    variant: str
    sha256: str
    length: int
    signature: dict[str, Any]
    created_ms: int
    signed: bool = False
    details: dict[str, Any] = field(default_factory=dict)  # measured metrics, eval results, why excluded


@dataclass
class DeviceRecord:
    id: str
    name: str
    group: str
    enrolled_ms: int
    last_seen_ms: int = 0
    current: dict[str, Any] | None = None
    previous: dict[str, Any] | None = None
    desired_target: str = ""
    desired_deployment: str = ""
    capabilities: dict[str, Any] = field(default_factory=dict)
    bad_targets: list[str] = field(default_factory=list)
    last_stage: str = ""
    last_reason: str = ""
    rollback_command: str = ""
    revoked: bool = False
    status_sequence: int = 0
    clock_skew_ms: int = 0


@dataclass
class Deployment:
    id: str
    model_name: str
    version: str
    selector: str
    created_ms: int
    kind: str = "deploy"  # or "rollback"
    reason: str = ""
    variant: str = ""  # pinned variant, "" = the per-device choice
    devices_targeted: int = 0  # every device it has pointed at, also those a later deployment took over


@dataclass
class EventRecord:
    device_id: str
    target_path: str
    stage: str
    reason: str
    at_ms: int
    deployment_id: str = ""


@dataclass
class RepoVersions:
    root: int = 0
    targets: int = 0
    snapshot: int = 0
    timestamp: int = 0


# ---- the interface ---------------------------------------------------------------------------------------


class FleetStore(abc.ABC):
    """Everything the server remembers except model bytes. Methods raise TransportError when the database is
    unavailable (the caller answers UNAVAILABLE), NotFoundError / ConflictError as named."""

    @abc.abstractmethod
    def create_enrollment_token(self, group: str, uses: int, expires_ms: int) -> str: ...

    @abc.abstractmethod
    def enroll(self, token: str, name: str, capabilities: dict[str, Any]) -> tuple[DeviceRecord, str]:
        """Consumes one use of `token`; returns the new device and its secret credential."""

    @abc.abstractmethod
    def device_for_token(self, device_token: str) -> DeviceRecord | None: ...

    @abc.abstractmethod
    def get_device(self, device_id: str) -> DeviceRecord: ...

    @abc.abstractmethod
    def list_devices(self) -> list[DeviceRecord]: ...

    @abc.abstractmethod
    def update_device(self, device_id: str, **fields: Any) -> None: ...

    @abc.abstractmethod
    def add_model(self, record: ModelRecord) -> None: ...

    @abc.abstractmethod
    def get_model(self, target_path: str) -> ModelRecord: ...

    @abc.abstractmethod
    def list_models(self, name: str = "") -> list[ModelRecord]: ...

    @abc.abstractmethod
    def mark_signed(self, target_paths: list[str]) -> None: ...

    @abc.abstractmethod
    def put_metadata(self, files: dict[str, bytes], versions: RepoVersions, expected: RepoVersions) -> None:
        """Stores a release atomically, only if the stored versions still equal `expected` (else ConflictError)."""

    @abc.abstractmethod
    def get_metadata(self, name: str) -> bytes: ...

    @abc.abstractmethod
    def repo_versions(self) -> RepoVersions: ...

    @abc.abstractmethod
    def add_deployment(self, deployment: Deployment, device_targets: dict[str, str]) -> None:
        """Records the deployment and sets each listed device's desired target, in one transaction."""

    @abc.abstractmethod
    def add_deployment_target(self, deployment_id: str, device_id: str, target: str) -> None:
        """Points one more device (e.g. one that enrolled later) at an existing deployment."""

    @abc.abstractmethod
    def list_deployments(self) -> list[Deployment]: ...

    @abc.abstractmethod
    def add_event(self, event: EventRecord) -> None: ...

    @abc.abstractmethod
    def list_events(
        self, device_id: str = "", limit: int = 100, deployment_id: str = ""
    ) -> list[EventRecord]: ...

    @abc.abstractmethod
    def add_telemetry(self, device_id: str, at_ms: int, report: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def list_telemetry(self, device_id: str, limit: int) -> list[tuple[int, dict[str, Any]]]: ...

    @abc.abstractmethod
    def close(self) -> None: ...


# ---- SQL implementation ----------------------------------------------------------------------------------

_meta = sa.MetaData()
_tokens = sa.Table(
    "enrollment_tokens",
    _meta,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("group_name", sa.String(128), nullable=False),
    sa.Column("uses_left", sa.Integer, nullable=False),
    sa.Column("expires_ms", sa.BigInteger, nullable=False),
)
_devices = sa.Table(
    "devices",
    _meta,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("group_name", sa.String(128), nullable=False, index=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("enrolled_ms", sa.BigInteger, nullable=False),
    sa.Column("last_seen_ms", sa.BigInteger, nullable=False, default=0),
    sa.Column("current", sa.JSON),
    sa.Column("previous", sa.JSON),
    sa.Column("desired_target", sa.String(512), nullable=False, default=""),
    sa.Column("desired_deployment", sa.String(64), nullable=False, default=""),
    sa.Column("capabilities", sa.JSON, nullable=False, default=dict),
    sa.Column("bad_targets", sa.JSON, nullable=False, default=list),
    sa.Column("last_stage", sa.String(32), nullable=False, default=""),
    sa.Column("last_reason", sa.Text, nullable=False, default=""),
    sa.Column("rollback_command", sa.String(64), nullable=False, default=""),
    sa.Column("revoked", sa.Boolean, nullable=False, default=False),
    sa.Column("status_sequence", sa.BigInteger, nullable=False, default=0),
    sa.Column("clock_skew_ms", sa.BigInteger, nullable=False, default=0),
)
_models = sa.Table(
    "models",
    _meta,
    sa.Column("target_path", sa.String(512), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, index=True),
    sa.Column("version", sa.String(128), nullable=False),
    sa.Column("variant", sa.String(64), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("length", sa.BigInteger, nullable=False),
    sa.Column("signature", sa.JSON, nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("signed", sa.Boolean, nullable=False, default=False),
    sa.Column("details", sa.JSON, nullable=False, default=dict),
)
_metadata_files = sa.Table(
    "metadata_files",
    _meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("content", sa.LargeBinary, nullable=False),
)
_schema = sa.Table(
    "schema_version",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True),  # one row
    sa.Column("version", sa.Integer, nullable=False),
)
_repo = sa.Table(
    "repo_versions",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("root", sa.Integer, nullable=False),
    sa.Column("targets", sa.Integer, nullable=False),
    sa.Column("snapshot", sa.Integer, nullable=False),
    sa.Column("timestamp", sa.Integer, nullable=False),
)
_deployments = sa.Table(
    "deployments",
    _meta,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("model_name", sa.String(128), nullable=False),
    sa.Column("version", sa.String(128), nullable=False),
    sa.Column("selector", sa.String(256), nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("variant", sa.String(64), nullable=False, default=""),
    sa.Column("devices_targeted", sa.Integer, nullable=False, server_default="0"),
)
_events = sa.Table(
    "events",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String(64), nullable=False, index=True),
    sa.Column("target_path", sa.String(512), nullable=False),
    sa.Column("stage", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    sa.Column("deployment_id", sa.String(64), nullable=False, default="", index=True),
)
_telemetry = sa.Table(
    "telemetry",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String(64), nullable=False, index=True),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    sa.Column("report", sa.JSON, nullable=False),
)


def _device(row: Any) -> DeviceRecord:
    m = row._mapping
    return DeviceRecord(
        id=m["id"],
        name=m["name"],
        group=m["group_name"],
        enrolled_ms=m["enrolled_ms"],
        last_seen_ms=m["last_seen_ms"],
        current=m["current"],
        previous=m["previous"],
        desired_target=m["desired_target"],
        desired_deployment=m["desired_deployment"],
        capabilities=m["capabilities"] or {},
        bad_targets=m["bad_targets"] or [],
        last_stage=m["last_stage"],
        last_reason=m["last_reason"],
        rollback_command=m["rollback_command"],
        revoked=m["revoked"],
        status_sequence=m["status_sequence"],
        clock_skew_ms=m["clock_skew_ms"],
    )


def _model(row: Any) -> ModelRecord:
    m = row._mapping
    return ModelRecord(
        target_path=m["target_path"],
        name=m["name"],
        version=m["version"],
        variant=m["variant"],
        sha256=m["sha256"],
        length=m["length"],
        signature=m["signature"],
        created_ms=m["created_ms"],
        signed=m["signed"],
        details=m["details"] or {},
    )


_DEVICE_FIELDS = {
    "group": "group_name",
    **{k: k for k in DeviceRecord.__dataclass_fields__ if k not in ("id", "group", "enrolled_ms")},
}


class SqlFleetStore(FleetStore):
    """SQLite or PostgreSQL through SQLAlchemy Core."""

    def __init__(self, url: str):
        self.url = url
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
            self._set_up_schema()
        except BaseException:
            self.engine.dispose()
            raise

    def _set_up_schema(self) -> None:
        with self._tx() as conn:
            if conn.dialect.name == "postgresql":  # servers starting together set the schema up one by one
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7368657)"))
            found = _schema_version(conn)
            if found is not None and found > SCHEMA_VERSION:
                raise SchemaMismatchError(
                    f"the database at {_safe_url(self.url)} has schema version {found}, made by a newer edgefleet "
                    f"(this one knows up to {SCHEMA_VERSION}); run that version or a newer one"
                )
            _meta.create_all(conn)  # the tables a new database needs; existing ones are left as they are
            if found is not None and found < 2:
                _migrate_to_2(conn)
            if found != SCHEMA_VERSION:
                conn.execute(_schema.delete())
                conn.execute(_schema.insert().values(id=1, version=SCHEMA_VERSION))
            if conn.execute(sa.select(_repo.c.id)).first() is None:
                conn.execute(_repo.insert().values(id=1, root=0, targets=0, snapshot=0, timestamp=0))

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

    def create_enrollment_token(self, group: str, uses: int, expires_ms: int) -> str:
        token = "enr_" + secrets.token_urlsafe(32)
        with self._tx() as conn:
            conn.execute(
                _tokens.insert().values(
                    token_hash=token_hash(token), group_name=group, uses_left=uses, expires_ms=expires_ms
                )
            )
        return token

    def enroll(self, token: str, name: str, capabilities: dict[str, Any]) -> tuple[DeviceRecord, str]:
        with self._tx() as conn:
            row = conn.execute(sa.select(_tokens).where(_tokens.c.token_hash == token_hash(token))).first()
            if row is None or row.uses_left <= 0 or row.expires_ms < now_ms():
                raise InvalidRequestError(
                    "enrollment token is unknown, used up or expired; ask for a new one"
                )
            # Decrement with a guard so two devices racing on the last use cannot both succeed.
            took = conn.execute(
                _tokens.update()
                .where(_tokens.c.token_hash == row.token_hash, _tokens.c.uses_left > 0)
                .values(uses_left=_tokens.c.uses_left - 1)
            )
            if took.rowcount != 1:
                raise InvalidRequestError("enrollment token is used up; ask for a new one")
            device_token = "dev_" + secrets.token_urlsafe(32)
            device = DeviceRecord(
                id="dev-" + secrets.token_hex(6),
                name=name,
                group=row.group_name,
                enrolled_ms=now_ms(),
                capabilities=capabilities,
            )
            conn.execute(
                _devices.insert().values(
                    id=device.id,
                    name=name,
                    group_name=device.group,
                    token_hash=token_hash(device_token),
                    enrolled_ms=device.enrolled_ms,
                    last_seen_ms=0,
                    capabilities=capabilities,
                    bad_targets=[],
                    desired_target="",
                    desired_deployment="",
                    last_stage="",
                    last_reason="",
                    rollback_command="",
                    revoked=False,
                    status_sequence=0,
                    clock_skew_ms=0,
                )
            )
        return device, device_token

    def device_for_token(self, device_token: str) -> DeviceRecord | None:
        with self._tx() as conn:
            row = conn.execute(
                sa.select(_devices).where(_devices.c.token_hash == token_hash(device_token))
            ).first()
        return _device(row) if row else None

    def get_device(self, device_id: str) -> DeviceRecord:
        with self._tx() as conn:
            row = conn.execute(sa.select(_devices).where(_devices.c.id == device_id)).first()
        if row is None:
            raise NotFoundError(f"no device {device_id!r}; see `edgefleet devices`")
        return _device(row)

    def list_devices(self) -> list[DeviceRecord]:
        with self._tx() as conn:
            return [
                _device(r) for r in conn.execute(sa.select(_devices).order_by(_devices.c.name, _devices.c.id))
            ]

    def update_device(self, device_id: str, **fields: Any) -> None:
        values = {_DEVICE_FIELDS[k]: v for k, v in fields.items()}
        with self._tx() as conn:
            conn.execute(_devices.update().where(_devices.c.id == device_id).values(**values))

    def add_model(self, record: ModelRecord) -> None:
        try:
            with self._tx() as conn:
                conn.execute(_models.insert().values(**record.__dict__))
        except IntegrityError as e:
            raise ConflictError(
                f"{record.target_path} already exists; versions are immutable, push a new one"
            ) from e

    def get_model(self, target_path: str) -> ModelRecord:
        with self._tx() as conn:
            row = conn.execute(sa.select(_models).where(_models.c.target_path == target_path)).first()
        if row is None:
            raise NotFoundError(f"no model file {target_path!r}; see `edgefleet model list`")
        return _model(row)

    def list_models(self, name: str = "") -> list[ModelRecord]:
        query = sa.select(_models).order_by(_models.c.name, _models.c.created_ms, _models.c.target_path)
        if name:
            query = query.where(_models.c.name == name)
        with self._tx() as conn:
            return [_model(r) for r in conn.execute(query)]

    def mark_signed(self, target_paths: list[str]) -> None:
        with self._tx() as conn:
            conn.execute(_models.update().where(_models.c.target_path.in_(target_paths)).values(signed=True))

    def put_metadata(self, files: dict[str, bytes], versions: RepoVersions, expected: RepoVersions) -> None:
        with self._tx() as conn:
            moved = conn.execute(
                _repo.update()
                .where(
                    _repo.c.id == 1,
                    _repo.c.root == expected.root,
                    _repo.c.targets == expected.targets,
                    _repo.c.snapshot == expected.snapshot,
                    _repo.c.timestamp == expected.timestamp,
                )
                .values(**versions.__dict__)
            )
            if moved.rowcount != 1:
                raise ConflictError("the signed metadata changed meanwhile; fetch it again and retry")
            for name, content in files.items():
                conn.execute(_metadata_files.delete().where(_metadata_files.c.name == name))
                conn.execute(_metadata_files.insert().values(name=name, content=content))

    def get_metadata(self, name: str) -> bytes:
        with self._tx() as conn:
            row = conn.execute(
                sa.select(_metadata_files.c.content).where(_metadata_files.c.name == name)
            ).first()
        if row is None:
            raise NotFoundError(f"no metadata {name!r}")
        return bytes(row.content)

    def repo_versions(self) -> RepoVersions:
        with self._tx() as conn:
            row = conn.execute(sa.select(_repo).where(_repo.c.id == 1)).one()
        return RepoVersions(row.root, row.targets, row.snapshot, row.timestamp)

    def add_deployment(self, deployment: Deployment, device_targets: dict[str, str]) -> None:
        with self._tx() as conn:
            conn.execute(_deployments.insert().values({**deployment.__dict__, "devices_targeted": 0}))
            pointed = 0
            by_target: dict[str, list[str]] = {}
            for device_id, target in device_targets.items():
                by_target.setdefault(target, []).append(device_id)
            for target, device_ids in by_target.items():
                values: dict[str, Any] = {"desired_target": target, "desired_deployment": deployment.id}
                # A rollback order stands until obeyed or replaced: a later deployment replaces it.
                values["rollback_command"] = deployment.id if deployment.kind == "rollback" else ""
                for i in range(0, len(device_ids), 500):  # well under any database's parameter limit
                    batch = device_ids[i : i + 500]
                    pointed += conn.execute(
                        _devices.update().where(_devices.c.id.in_(batch)).values(**values)
                    ).rowcount
            conn.execute(
                _deployments.update()
                .where(_deployments.c.id == deployment.id)
                .values(devices_targeted=pointed)
            )

    def add_deployment_target(self, deployment_id: str, device_id: str, target: str) -> None:
        with self._tx() as conn:
            pointed = conn.execute(
                _devices.update()
                .where(_devices.c.id == device_id, _devices.c.desired_deployment != deployment_id)
                .values(desired_target=target, desired_deployment=deployment_id)
            )
            if pointed.rowcount:  # count each device once
                conn.execute(
                    _deployments.update()
                    .where(_deployments.c.id == deployment_id)
                    .values(devices_targeted=_deployments.c.devices_targeted + 1)
                )

    def list_deployments(self) -> list[Deployment]:
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(_deployments).order_by(_deployments.c.created_ms, _deployments.c.id)
            )
            return [Deployment(**r._mapping) for r in rows]

    def add_event(self, event: EventRecord) -> None:
        with self._tx() as conn:
            conn.execute(_events.insert().values(**event.__dict__))

    def list_events(
        self, device_id: str = "", limit: int = 100, deployment_id: str = ""
    ) -> list[EventRecord]:
        query = sa.select(_events).order_by(_events.c.id.desc()).limit(limit)
        if device_id:
            query = query.where(_events.c.device_id == device_id)
        if deployment_id:
            query = query.where(_events.c.deployment_id == deployment_id)
        with self._tx() as conn:
            rows = list(conn.execute(query))
        return [EventRecord(**{k: v for k, v in r._mapping.items() if k != "id"}) for r in reversed(rows)]

    def add_telemetry(self, device_id: str, at_ms: int, report: dict[str, Any]) -> None:
        with self._tx() as conn:
            conn.execute(_telemetry.insert().values(device_id=device_id, at_ms=at_ms, report=report))

    def list_telemetry(self, device_id: str, limit: int) -> list[tuple[int, dict[str, Any]]]:
        query = (
            sa.select(_telemetry.c.at_ms, _telemetry.c.report)
            .where(_telemetry.c.device_id == device_id)
            .order_by(_telemetry.c.id.desc())
            .limit(limit)
        )
        with self._tx() as conn:
            return [(r.at_ms, r.report) for r in reversed(list(conn.execute(query)))]


def open_store(url: str) -> FleetStore:
    """`sqlite:///path` or `postgresql://user@host/db`. Raises InvalidRequestError for other schemes."""
    if url.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
        return SqlFleetStore(url)
    raise InvalidRequestError(f"unsupported database url {url!r}: use sqlite:///PATH or postgresql://...")


# ---- blobs -----------------------------------------------------------------------------------------------


class BlobStore(abc.ABC):
    @abc.abstractmethod
    def begin_write(self) -> BlobWriter: ...

    @abc.abstractmethod
    def path(self, sha256: str) -> Path: ...

    @abc.abstractmethod
    def read(self, sha256: str, offset: int, chunk_size: int) -> Iterator[bytes]: ...


class BlobWriter:
    """Streams bytes to a temp file, hashing as it goes; `commit` moves it to its content address."""

    def __init__(self, store: FilesystemBlobStore, max_bytes: int):
        self._store = store
        self._max = max_bytes
        self._hash = hashlib.sha256()
        self.length = 0
        fd, tmp = _mkstemp(store.root / "tmp")
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self.length += len(chunk)
        if self.length > self._max:
            raise InvalidRequestError(f"upload is larger than the {self._max}-byte limit")
        self._hash.update(chunk)
        self._file.write(chunk)

    def commit(self, expected_sha256: str = "") -> str:
        digest = self._hash.hexdigest()
        if expected_sha256 and digest != expected_sha256:
            raise HashMismatchError(f"upload hashes to {digest}, the header said {expected_sha256}")
        self._file.close()
        final = self._store.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        commit_file(self._tmp, final)
        return digest

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def _mkstemp(folder: Path) -> tuple[int, str]:
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=folder, suffix=".part")


class FilesystemBlobStore(BlobStore):
    def __init__(self, root: Path, max_bytes: int = 2 * 2**30):
        self.root = Path(root)
        self.max_bytes = max_bytes
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        for stale in (self.root / "tmp").glob("*.part"):  # left by a crash mid-upload
            stale.unlink(missing_ok=True)

    def begin_write(self) -> BlobWriter:
        return BlobWriter(self, self.max_bytes)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise InvalidRequestError("bad sha256")
        return self.root / sha256[:2] / sha256

    def read(self, sha256: str, offset: int, chunk_size: int) -> Iterator[bytes]:
        with open(self.path(sha256), "rb") as f:
            f.seek(offset)
            while chunk := f.read(chunk_size):
                yield chunk

    def put_bytes(self, data: bytes) -> str:
        writer = self.begin_write()
        try:
            writer.write(data)
            return writer.commit()
        except BaseException:
            writer.abort()
            raise


def sqlalchemy_url(url: str) -> str:
    """The URL SQLAlchemy needs: `postgresql://` means the psycopg 3 driver, the one edgefleet installs."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def _safe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return sa.engine.make_url(url).render_as_string(hide_password=True)


def _schema_version(conn: sa.Connection) -> int | None:
    """The database's schema version; None for an empty database."""
    tables = set(sa.inspect(conn).get_table_names())
    if _schema.name in tables:
        found = conn.execute(sa.select(sa.func.max(_schema.c.version))).scalar()
        if found is not None:
            return int(found)
    # Our tables without a version row: made before versions (1), or a first start that stopped half-way
    # (SQLite commits each CREATE TABLE on its own); the migrations below cope with either.
    return 1 if tables & (set(_meta.tables) - {_schema.name}) else None


def _migrate_to_2(conn: sa.Connection) -> None:
    """Version 2 added deployments.devices_targeted. What version 1 knew of it: the devices that still point
    at each deployment."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns("deployments")}
    if "devices_targeted" not in columns:
        conn.execute(
            sa.text("ALTER TABLE deployments ADD COLUMN devices_targeted INTEGER NOT NULL DEFAULT 0")
        )
    pointing = sa.select(_devices.c.desired_deployment, sa.func.count()).group_by(
        _devices.c.desired_deployment
    )
    for deployment_id, count in conn.execute(pointing).all():
        conn.execute(
            _deployments.update().where(_deployments.c.id == deployment_id).values(devices_targeted=count)
        )
