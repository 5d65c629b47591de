"""The SQL tables, the schema version the database records, and the steps that bring an older database up
to date. A server migrates an older database when it starts (keeping every record) and refuses one made by
a newer edgefleet, instead of failing later on a missing column.
"""

from __future__ import annotations

import sqlalchemy as sa

from edgefleet.audit_chain import GENESIS
from edgefleet.errors import EdgefleetError

# Raise it with every change to the tables below, and add the step that brings an older database up to it
# (`_migrate_to_2`).
SCHEMA_VERSION = 4
# Servers starting together on one PostgreSQL database set the schema up one by one, under this lock.
_SCHEMA_LOCK = 7368657


class SchemaMismatchError(EdgefleetError):
    """The database was made by a newer edgefleet, with tables this one does not know."""


meta = sa.MetaData()
tokens = sa.Table(
    "enrollment_tokens",
    meta,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("group_name", sa.String(128), nullable=False),
    sa.Column("uses_left", sa.Integer, nullable=False),
    sa.Column("expires_ms", sa.BigInteger, nullable=False),
    sa.Column("labels", sa.JSON),  # version 3: the labels its devices get; NULL = none
)
devices = sa.Table(
    "devices",
    meta,
    sa.Column("id", sa.String(64), primary_key=True),
    # Indexed: a device's name is accepted wherever its id is (`device:cam-1`, `telemetry cam-1`).
    sa.Column("name", sa.String(128), nullable=False, index=True),
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
models = sa.Table(
    "models",
    meta,
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
metadata_files = sa.Table(
    "metadata_files",
    meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("content", sa.LargeBinary, nullable=False),
)
schema = sa.Table(
    "schema_version",
    meta,
    sa.Column("id", sa.Integer, primary_key=True),  # one row
    sa.Column("version", sa.Integer, nullable=False),
)
repo = sa.Table(
    "repo_versions",
    meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("root", sa.Integer, nullable=False),
    sa.Column("targets", sa.Integer, nullable=False),
    sa.Column("snapshot", sa.Integer, nullable=False),
    sa.Column("timestamp", sa.Integer, nullable=False),
)
deployments = sa.Table(
    "deployments",
    meta,
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
events = sa.Table(
    "events",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String(64), nullable=False, index=True),
    sa.Column("target_path", sa.String(512), nullable=False),
    sa.Column("stage", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    sa.Column("deployment_id", sa.String(64), nullable=False, default="", index=True),
)
telemetry = sa.Table(
    "telemetry",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String(64), nullable=False, index=True),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    sa.Column("report", sa.JSON, nullable=False),
)


# ---- device labels (version 3) ----------------------------------------------------------------------------
# A row per label, so that a label selector is a query (EXISTS on key and value), not a scan of every device.
device_labels = sa.Table(
    "device_labels",
    meta,
    sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), primary_key=True),
    sa.Column("key", sa.String(63), primary_key=True),
    sa.Column("value", sa.String(63), nullable=False),
    sa.Index("device_labels_by_key_value", "key", "value"),
)

# ---- the audit log (version 3) ------------------------------------------------------------------------------
# Append-only: the store inserts and lists, nothing else. Each entry carries the hash chain
# (edgefleet.audit_chain); audit_head is the newest entry's seq and hash, which appending updates under its
# row lock, so servers sharing a database append one at a time and the chain never forks.
audit_log = sa.Table(
    "audit_log",
    meta,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("at_ms", sa.BigInteger, nullable=False, index=True),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("action", sa.String(64), nullable=False, index=True),
    sa.Column("subject", sa.String(512), nullable=False),
    sa.Column("details", sa.Text, nullable=False),  # canonical JSON text, exactly what was hashed
    sa.Column("previous_sha256", sa.String(64), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
)
audit_head = sa.Table(
    "audit_head",
    meta,
    sa.Column("id", sa.Integer, primary_key=True),  # one row
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
)


def set_up_schema(conn: sa.Connection, shown_url: str) -> None:
    """Creates the tables of a new database, migrates an older one, refuses a newer one
    (SchemaMismatchError); in the caller's transaction."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})"))
    found = _schema_version(conn)
    if found is not None and found > SCHEMA_VERSION:
        raise SchemaMismatchError(
            f"the database at {shown_url} has schema version {found}, made by a newer edgefleet "
            f"(this one knows up to {SCHEMA_VERSION}); run that version or a newer one"
        )
    meta.create_all(conn)  # the tables a new database needs; existing ones are left as they are
    if found is not None and found < 2:
        _migrate_to_2(conn)
    if found is not None and found < 3:
        _migrate_to_3(conn)
    if found is not None and found < 4:
        _migrate_to_4(conn)
    _create_missing_indexes(conn)  # after the migrations: an index may be on a column one of them adds
    if found != SCHEMA_VERSION:
        conn.execute(schema.delete())
        conn.execute(schema.insert().values(id=1, version=SCHEMA_VERSION))
    if conn.execute(sa.select(repo.c.id)).first() is None:
        conn.execute(repo.insert().values(id=1, root=0, targets=0, snapshot=0, timestamp=0))
    if conn.execute(sa.select(audit_head.c.id)).first() is None:
        conn.execute(audit_head.insert().values(id=1, seq=0, sha256=GENESIS))


def _schema_version(conn: sa.Connection) -> int | None:
    """The database's schema version; None for an empty database."""
    tables = set(sa.inspect(conn).get_table_names())
    if schema.name in tables:
        found = conn.execute(sa.select(sa.func.max(schema.c.version))).scalar()
        if found is not None:
            return int(found)
    # Our tables without a version row: made before versions (1), or a first start that stopped half-way
    # (SQLite commits each CREATE TABLE on its own); the migrations below cope with either.
    return 1 if tables & (set(meta.tables) - {schema.name}) else None


def _migrate_to_2(conn: sa.Connection) -> None:
    """Version 2 added deployments.devices_targeted. What version 1 knew of it: the devices that still point
    at each deployment."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns("deployments")}
    if "devices_targeted" not in columns:
        conn.execute(
            sa.text("ALTER TABLE deployments ADD COLUMN devices_targeted INTEGER NOT NULL DEFAULT 0")
        )
    pointing = sa.select(devices.c.desired_deployment, sa.func.count()).group_by(devices.c.desired_deployment)
    for deployment_id, count in conn.execute(pointing).all():
        conn.execute(
            deployments.update().where(deployments.c.id == deployment_id).values(devices_targeted=count)
        )


def _migrate_to_3(conn: sa.Connection) -> None:
    """Version 3 added device labels (the device_labels table, made by create_all), the labels an
    enrollment token gives its devices (devices and tokens made before have none) and the audit log (its
    tables made by create_all, empty: nothing was audited before)."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns("enrollment_tokens")}
    if "labels" not in columns:
        conn.execute(sa.text("ALTER TABLE enrollment_tokens ADD COLUMN labels JSON"))


def _migrate_to_4(conn: sa.Connection) -> None:
    """Version 4 added rollout_members.retry_order (an operator's retry-failed order; members made before
    were never retried). The rollout tables are made by the rollout store: an older database may not have
    them yet, and then gets them whole."""
    if "rollout_members" not in set(sa.inspect(conn).get_table_names()):
        return
    columns = {c["name"] for c in sa.inspect(conn).get_columns("rollout_members")}
    if "retry_order" not in columns:
        conn.execute(
            sa.text("ALTER TABLE rollout_members ADD COLUMN retry_order VARCHAR(96) NOT NULL DEFAULT ''")
        )


def _create_missing_indexes(conn: sa.Connection) -> None:
    """An index added to a table later (devices.name) is created on an existing database at start. It changes
    no record and an older edgefleet uses the database as it did, so it needs no schema version of its own."""
    for table in meta.sorted_tables:
        for index in table.indexes:
            index.create(conn, checkfirst=True)
