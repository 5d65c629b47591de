"""Indexes a later edgefleet adds (devices.name, since names are accepted wherever ids are) are created on an
existing database when the server starts, on SQLite and PostgreSQL, keeping every record."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import database_url

from edgefleet.server.storage import open_store
from edgefleet.server.storage.records import DeviceRecord, now_ms
from edgefleet.server.storage.sql import sqlalchemy_url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return database_url(str(request.param), tmp_path)


def _indexed_columns(url: str, table: str) -> set[tuple[str, ...]]:
    engine = sa.create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as conn:
            return {tuple(i["column_names"]) for i in sa.inspect(conn).get_indexes(table)}
    finally:
        engine.dispose()


def test_a_fleet_db_without_the_device_name_index_gets_it_at_start_and_keeps_its_devices(url: str) -> None:
    store = open_store(url)
    store.add_enrollment_token("enr_1", "lab", 1, now_ms() + 60_000)
    assert store.enroll_device("enr_1", now_ms(), DeviceRecord("dev-1", "cam-1", "lab", now_ms()), "secret")
    store.close()
    engine = sa.create_engine(sqlalchemy_url(url))
    with engine.begin() as conn:  # what a database made before the index looks like
        conn.execute(sa.text("DROP INDEX ix_devices_name"))
    engine.dispose()
    assert ("name",) not in _indexed_columns(url, "devices")

    store = open_store(url)
    try:
        assert ("name",) in _indexed_columns(url, "devices")
        assert [d.id for d in store.devices_named("cam-1")] == ["dev-1"]
    finally:
        store.close()
    open_store(url).close()  # and it opens again with nothing to create


def test_a_lookup_by_name_uses_the_index_on_sqlite(tmp_path: Path) -> None:
    url = database_url("sqlite", tmp_path)
    open_store(url).close()
    engine = sa.create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as conn:
            plan = conn.execute(
                sa.text("EXPLAIN QUERY PLAN SELECT * FROM devices WHERE name = 'cam-1'")
            ).all()
    finally:
        engine.dispose()
    assert any("USING INDEX ix_devices_name" in str(row) for row in plan), plan
