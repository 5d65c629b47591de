"""The RolloutStore contract, on every backend (memory, SQLite, PostgreSQL when scripts/test started one):
rollouts, waves, members and timeline round-trip, a duplicate id is refused, and gate samples come from the
fleet store's own telemetry rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import database_url

from edgefleet.errors import ConflictError, NotFoundError
from edgefleet.server.storage import open_store
from edgefleet.server.storage.interfaces import FleetStore
from edgefleet.server.storage.rollout_records import MemberRecord, RolloutRecord, TimelineEntry, WaveRecord
from edgefleet.server.storage.sql import sqlalchemy_url
from edgefleet.values import InferenceStats, TelemetryReport


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FleetStore]:
    url = "memory://" if request.param == "memory" else database_url(str(request.param), tmp_path)
    s = open_store(url)
    yield s
    s.close()


def _rollout(rollout_id: str = "ro-abcd") -> RolloutRecord:
    return RolloutRecord(
        rollout_id, "nightly", "detector", "2", "all", 1000, "operator", "{}", updated_ms=1000
    )


def test_a_rollout_round_trips_with_its_waves_members_and_timeline(store: FleetStore) -> None:
    r = store.rollouts()
    waves = [WaveRecord("ro-abcd", 0, True, 5), WaveRecord("ro-abcd", 1, False, 50)]
    members = [
        MemberRecord("ro-abcd", "dev-1", 0, "canary", target_path="detector/2/float32.tflite"),
        MemberRecord("ro-abcd", "dev-2", 0, "control"),
        MemberRecord("ro-abcd", "dev-2", 1, "canary", target_path="detector/2/int8.tflite"),
    ]
    r.add_rollout(_rollout(), waves, members)
    with pytest.raises(ConflictError):
        r.add_rollout(_rollout(), [], [])
    assert r.get_rollout("ro-abcd") == _rollout()
    assert r.waves("ro-abcd") == waves
    key = lambda m: (m.device_id, m.role)  # noqa: E731
    assert sorted(r.members("ro-abcd"), key=key) == sorted(members, key=key)
    r.update_rollout("ro-abcd", state="paused", current_wave=1)
    r.update_wave("ro-abcd", 1, state="soaking", started_ms=5)
    r.update_members("ro-abcd", [("dev-1", "canary", {"state": "healthy", "healthy_ms": 7})])
    r.add_members(
        [MemberRecord("ro-abcd", "dev-1", 1, "canary"), MemberRecord("ro-abcd", "dev-3", 1, "canary")]
    )
    assert r.get_rollout("ro-abcd").state == "paused"
    assert r.waves("ro-abcd")[1].started_ms == 5
    by_key = {(m.device_id, m.role): m for m in r.members("ro-abcd")}
    assert by_key[("dev-1", "canary")].state == "healthy" and by_key[("dev-1", "canary")].wave_index == 0
    assert ("dev-3", "canary") in by_key
    r.add_timeline([TimelineEntry("ro-abcd", 1, "started"), TimelineEntry("ro-abcd", 2, "wave 0 started")])
    assert [e.what for e in r.timeline("ro-abcd")] == ["started", "wave 0 started"]
    assert [x.id for x in r.list_rollouts()] == ["ro-abcd"]
    with pytest.raises(NotFoundError):
        r.get_rollout("ro-none")


def test_gate_samples_are_the_fleet_stores_telemetry_rows(store: FleetStore) -> None:
    for at in (100, 200, 300):
        report = TelemetryReport(at, inference=(InferenceStats("detector/2/float32.tflite", count=at),))
        store.add_telemetry("dev-1", report)
    store.add_telemetry("dev-2", TelemetryReport(250))
    found = store.rollouts().telemetry_since(["dev-1", "dev-2", "dev-9"], 200)
    assert [rep.at_ms for rep in found["dev-1"]] == [200, 300]
    assert found["dev-1"][0].inference[0].count == 200
    assert [rep.at_ms for rep in found["dev-2"]] == [250]
    assert "dev-9" not in found


def test_a_members_retry_order_round_trips(store: FleetStore) -> None:
    r = store.rollouts()
    r.add_rollout(
        _rollout(), [WaveRecord("ro-abcd", 0, False, 5)], [MemberRecord("ro-abcd", "dev-1", 0, "canary")]
    )
    assert r.members("ro-abcd")[0].retry_order == ""  # never retried
    r.update_members("ro-abcd", [("dev-1", "canary", {"retry_order": "ro-abcd-w0-retry1", "assigned_ms": 0})])
    assert r.members("ro-abcd")[0].retry_order == "ro-abcd-w0-retry1"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_version_3_database_gains_retry_order_and_keeps_its_members(backend: str, tmp_path: Path) -> None:
    url = database_url(backend, tmp_path)
    store = open_store(url)
    store.rollouts().add_rollout(
        _rollout(),
        [WaveRecord("ro-abcd", 0, False, 5)],
        [MemberRecord("ro-abcd", "dev-1", 0, "canary", state="failed", target_path="detector/2/f.tflite")],
    )
    store.close()
    engine = sa.create_engine(sqlalchemy_url(url))
    with engine.begin() as conn:  # what version 3 left: members without retry_order
        conn.execute(sa.text("ALTER TABLE rollout_members DROP COLUMN retry_order"))
        conn.execute(sa.text("UPDATE schema_version SET version = 3"))
    engine.dispose()
    migrated = open_store(url)
    try:
        [member] = migrated.rollouts().members("ro-abcd")
        assert (member.state, member.target_path, member.retry_order) == ("failed", "detector/2/f.tflite", "")
        migrated.rollouts().update_members("ro-abcd", [("dev-1", "canary", {"retry_order": "x-retry1"})])
        assert migrated.rollouts().members("ro-abcd")[0].retry_order == "x-retry1"
    finally:
        migrated.close()
    open_store(url).close()  # opens again as a version-4 database, nothing migrated twice
