"""The FleetStore contract, run against every backend: in memory, SQLite, and PostgreSQL when
EDGEFLEET_TEST_POSTGRES_URL names one. Then the SQL-only parts (schema versions, migration) and the blob
store, and the token rule that sits above storage."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import database_url

from edgefleet.errors import ConflictError, HashMismatchError, InvalidRequestError, NotFoundError
from edgefleet.selectors import parse_selector
from edgefleet.server.rules import token_refusal
from edgefleet.server.storage import open_store
from edgefleet.server.storage.blobs import FilesystemBlobStore
from edgefleet.server.storage.interfaces import FleetStore
from edgefleet.server.storage.records import (
    Deployment,
    DeploymentCounts,
    DeviceRecord,
    EventRecord,
    ModelRecord,
    RepoVersions,
    now_ms,
)
from edgefleet.server.storage.schema import SCHEMA_VERSION, SchemaMismatchError
from edgefleet.server.storage.sql import sqlalchemy_url
from edgefleet.values import Capabilities, HealthSample, InferenceStats, ModelRef, TelemetryReport

SQL_BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=["memory", *SQL_BACKENDS])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=SQL_BACKENDS)
def sql_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _url(backend: str, tmp_path: Path) -> str:
    return "memory://" if backend == "memory" else database_url(backend, tmp_path)


@pytest.fixture
def store(backend: str, tmp_path: Path) -> Iterator[FleetStore]:
    s = open_store(_url(backend, tmp_path))
    yield s
    s.close()


def _model(path: str = "m/1/float32.tflite", sha: str = "a" * 64) -> ModelRecord:
    name, version, _ = path.split("/")
    return ModelRecord(path, name, version, "float32", sha, 10, {"inputs": [], "outputs": []}, now_ms())


_serial = iter(range(10**6))


def _enroll(store: FleetStore, name: str, group: str = "g") -> tuple[DeviceRecord, str]:
    token = f"enr_{next(_serial)}"
    store.add_enrollment_token(token, group, 1, now_ms() + 60_000)
    device = DeviceRecord(f"dev-{name}", name, group, now_ms())
    secret = f"dev_secret_{name}"
    assert store.enroll_device(token, now_ms(), device, secret)
    return device, secret


def _ref(path: str) -> ModelRef:
    return ModelRef(path, "m", path.split("/")[1], "float32", "a" * 64, 10)


def _status(store: FleetStore, device_id: str, sequence: int, current: str = "", **fields: object) -> bool:
    values: dict[str, object] = {
        "current": _ref(current) if current else None,
        "previous": None,
        "capabilities": Capabilities(),
        "bad_targets": (),
        "sequence": sequence,
        "clock_skew_ms": 0,
        "seen_ms": now_ms(),
        **fields,
    }
    return store.record_status(device_id, **values)  # type: ignore[arg-type]


# ---- enrollment -------------------------------------------------------------------------------------------


def test_enrollment_token_is_consumed_once_per_use(store: FleetStore) -> None:
    store.add_enrollment_token("enr_once", "lab", 1, now_ms() + 60_000)
    assert store.enrollment_token("enr_once") is not None
    device = DeviceRecord("dev-cam", "cam", "lab", now_ms(), capabilities=Capabilities(runtime="x"))
    assert store.enroll_device("enr_once", now_ms(), device, "dev_secret")
    found = store.device_for_token("dev_secret")
    assert found is not None and found.id == device.id and found.group == "lab"
    assert found.capabilities == Capabilities(runtime="x")
    left = store.enrollment_token("enr_once")
    assert left is not None and left.uses_left == 0
    second = DeviceRecord("dev-cam-2", "cam-2", "lab", now_ms())
    assert not store.enroll_device("enr_once", now_ms(), second, "dev_other")  # used up: nothing written
    assert store.device_for_token("dev_other") is None
    with pytest.raises(NotFoundError):
        store.get_device("dev-cam-2")


def test_expired_or_unknown_enrollment_token_admits_no_device(store: FleetStore) -> None:
    store.add_enrollment_token("enr_old", "lab", 5, now_ms() - 1)
    for token in ("enr_old", "enr_nonsense"):
        assert not store.enroll_device(token, now_ms(), DeviceRecord("dev-x", "x", "lab", now_ms()), "dev_x")
    assert store.enrollment_token("enr_nonsense") is None
    assert store.list_devices() == []


def test_the_token_rule_refuses_unknown_used_up_and_expired_tokens_alike(store: FleetStore) -> None:
    now = now_ms()
    store.add_enrollment_token("enr_fresh", "lab", 1, now + 60_000)
    store.add_enrollment_token("enr_used", "lab", 0, now + 60_000)
    store.add_enrollment_token("enr_expired", "lab", 5, now - 1)
    assert token_refusal(store.enrollment_token("enr_fresh"), now) == ""
    for token in ("enr_used", "enr_expired", "enr_unknown"):
        refusal = token_refusal(store.enrollment_token(token), now)
        assert "used up" in refusal and "ask for a new one" in refusal


def test_storage_errors_name_the_record_but_give_no_cli_hints(store: FleetStore) -> None:
    for call, named in (
        (lambda: store.get_device("dev-nope"), "dev-nope"),
        (lambda: store.get_model("m/9/x"), "m/9/x"),
    ):
        with pytest.raises(NotFoundError) as caught:
            call()
        assert named in str(caught.value) and "edgefleet" not in str(caught.value)


# ---- devices ----------------------------------------------------------------------------------------------


def test_device_status_round_trips_as_typed_values(store: FleetStore) -> None:
    device, _ = _enroll(store, "cam")
    caps = Capabilities(runtime="ai-edge-litert", cpu_count=4, accelerators=("npu",), latency_budget_ms=2.5)
    assert _status(
        store,
        device.id,
        1,
        "m/2/float32.tflite",
        previous=_ref("m/1/float32.tflite"),
        capabilities=caps,
        bad_targets=("x",),
        clock_skew_ms=-7,
    )
    again = store.get_device(device.id)
    assert again.current == _ref("m/2/float32.tflite") and again.previous == _ref("m/1/float32.tflite")
    assert again.capabilities == caps and again.bad_targets == ("x",)
    assert (again.status_sequence, again.clock_skew_ms) == (1, -7)
    with pytest.raises(NotFoundError):
        store.get_device("dev-nope")


def test_a_status_report_not_newer_than_the_last_changes_nothing(store: FleetStore) -> None:
    device, _ = _enroll(store, "cam")
    assert _status(store, device.id, 5, "m/2/float32.tflite")
    assert not _status(store, device.id, 5, "m/1/float32.tflite")  # a replay
    assert not _status(store, device.id, 4, "m/1/float32.tflite")  # a reordering
    again = store.get_device(device.id)
    assert again.current_target == "m/2/float32.tflite" and again.status_sequence == 5


def test_events_and_statuses_share_one_sequence_that_only_goes_up(store: FleetStore) -> None:
    device, _ = _enroll(store, "cam")
    assert _status(store, device.id, 5, "m/2/float32.tflite")
    assert store.advance_sequence(device.id, 6)  # an event
    assert not store.advance_sequence(device.id, 6)  # its replay
    assert not store.advance_sequence(device.id, 3)
    assert not _status(store, device.id, 6, "m/1/float32.tflite")  # not newer than the event
    assert not store.advance_sequence("dev-nope", 9)
    again = store.get_device(device.id)
    assert again.current_target == "m/2/float32.tflite" and again.status_sequence == 6


def test_stage_touch_and_revocation_are_recorded(store: FleetStore) -> None:
    device, _ = _enroll(store, "cam")
    store.record_stage(device.id, "failed", "golden output differs", 1234)
    store.touch(device.id, 5678)
    store.set_revoked(device.id)
    again = store.get_device(device.id)
    assert (again.last_stage, again.last_reason) == ("failed", "golden output differs")
    assert again.last_seen_ms == 5678 and again.revoked
    with pytest.raises(NotFoundError):
        store.set_revoked("dev-nope")


def test_devices_are_found_by_name_and_a_name_may_be_shared(store: FleetStore) -> None:
    for device_id, name in (("dev-b", "cam"), ("dev-a", "cam"), ("dev-c", "door")):
        token = f"enr_{next(_serial)}"
        store.add_enrollment_token(token, "g", 1, now_ms() + 60_000)
        assert store.enroll_device(token, now_ms(), DeviceRecord(device_id, name, "g", now_ms()), token)
    assert [d.id for d in store.devices_named("cam")] == ["dev-a", "dev-b"]
    assert [d.id for d in store.devices_named("door")] == ["dev-c"]
    assert store.devices_named("nobody") == []


def test_a_rollback_order_is_cleared_only_by_its_own_command(store: FleetStore) -> None:
    device, _ = _enroll(store, "cam")
    store.add_deployment(
        Deployment("rb-1", "", "", "all", now_ms(), kind="rollback"), {device.id: "m/0/x"}, "rb-1"
    )
    assert store.get_device(device.id).rollback_command == "rb-1"
    assert not store.clear_rollback(device.id, "rb-other")
    assert store.get_device(device.id).rollback_command == "rb-1"
    assert store.clear_rollback(device.id, "rb-1")
    assert store.get_device(device.id).rollback_command == ""


def test_selectors_are_answered_by_the_store(store: FleetStore) -> None:
    a, _ = _enroll(store, "a", group="lab")
    b, _ = _enroll(store, "b", group="lab")
    c, _ = _enroll(store, "c", group="field")

    def ids(text: str) -> list[str]:
        return [d.id for d in store.devices_matching(parse_selector(text))]

    assert ids("all") == [a.id, b.id, c.id] == [d.id for d in store.list_devices()]
    assert ids("group:lab") == [a.id, b.id]
    assert ids("group:nowhere") == []
    assert ids(f"device:{c.id}") == [c.id]
    assert ids("device:dev-nope") == []


# ---- models and metadata ----------------------------------------------------------------------------------


def test_model_versions_are_immutable(store: FleetStore) -> None:
    store.add_model(_model())
    with pytest.raises(ConflictError):
        store.add_model(_model(sha="b" * 64))
    store.mark_signed(["m/1/float32.tflite"])
    assert store.get_model("m/1/float32.tflite").signed
    assert [m.target_path for m in store.list_models("m")] == ["m/1/float32.tflite"]
    assert store.list_models("other") == []


def test_metadata_release_is_compare_and_swap(store: FleetStore) -> None:
    start = store.repo_versions()
    store.put_metadata({"1.root": b"r"}, RepoVersions(root=1), start)
    with pytest.raises(ConflictError):
        store.put_metadata({"1.root": b"other"}, RepoVersions(root=1), start)  # lost the race
    assert store.get_metadata("1.root") == b"r" and store.repo_versions() == RepoVersions(root=1)
    with pytest.raises(NotFoundError):
        store.get_metadata("2.root")


# ---- deployments ------------------------------------------------------------------------------------------


def test_deployment_sets_desired_targets_atomically(store: FleetStore) -> None:
    a, _ = _enroll(store, "a")
    store.add_deployment(Deployment("dep-1", "m", "1", "all", now_ms()), {a.id: "m/1/float32.tflite"})
    assert store.get_device(a.id).desired_target == "m/1/float32.tflite"
    rollback = Deployment("rb-1", "", "", "all", now_ms() + 1, kind="rollback")
    store.add_deployment(rollback, {a.id: "m/0/float32.tflite"}, rollback_command="rb-1")
    assert store.get_device(a.id).rollback_command == "rb-1"
    store.add_deployment(Deployment("dep-2", "m", "2", "all", now_ms() + 2), {a.id: "m/2/float32.tflite"})
    assert store.get_device(a.id).rollback_command == ""  # a later deployment replaces the order
    assert [d.id for d in store.list_deployments()] == ["dep-1", "rb-1", "dep-2"]
    # So does a rollout wave pointing devices one at a time: else the stale order wins over the new one.
    store.add_deployment(
        Deployment("rb-2", "", "", "all", now_ms() + 3, kind="rollback"), {a.id: "m/1/x"}, "rb-2"
    )
    store.record_stage(a.id, "rolled_back", "ordered", now_ms())
    store.add_deployment(Deployment("ro-1-w0", "m", "3", "rollout:ro-1", now_ms() + 4, kind="rollout"), {})
    store.add_deployment_target("ro-1-w0", a.id, "m/3/float32.tflite")
    device = store.get_device(a.id)
    assert device.rollback_command == ""
    # and in the same write its last stage: a report on the new order may follow at once
    assert (device.last_stage, device.last_reason) == ("", "")
    store.record_stage(a.id, "healthy", "", now_ms())
    store.add_deployment_target("ro-1-w0", a.id, "m/3/float32.tflite")  # the same order again: kept
    assert store.get_device(a.id).last_stage == "healthy"


def test_a_stage_is_recorded_only_for_the_order_it_was_judged_against(store: FleetStore) -> None:
    a, _ = _enroll(store, "a")
    store.add_deployment(Deployment("dep-1", "m", "1", "all", now_ms()), {a.id: "m/1/x"})
    seen = now_ms()
    assert store.record_stage(a.id, "failed", "bad bytes", seen, deployment="dep-1")
    store.add_deployment(Deployment("ro-1-w0", "m", "2", "rollout:ro-1", now_ms() + 1, kind="rollout"), {})
    store.add_deployment_target("ro-1-w0", a.id, "m/2/x")  # a wave points it
    # A report read while the device was on dep-1, written after the wave's order landed: not the wave's.
    assert not store.record_stage(a.id, "failed", "bad bytes", seen + 5, deployment="dep-1")
    device = store.get_device(a.id)
    assert (device.desired_deployment, device.last_stage) == ("ro-1-w0", "")
    # Without a deployment it is written; last seen never goes back to an older time.
    assert store.record_stage(a.id, "healthy", "", seen - 60_000)
    device = store.get_device(a.id)
    assert device.last_stage == "healthy" and device.last_seen_ms >= seen


def test_a_deployment_counts_every_device_it_pointed_at_once(store: FleetStore) -> None:
    a, b, late = (_enroll(store, name)[0] for name in ("a", "b", "late"))
    store.add_deployment(Deployment("dep-1", "m", "1", "all", now_ms()), {a.id: "m/1/x", b.id: "m/1/x"})
    store.add_deployment_target("dep-1", late.id, "m/1/x")
    store.add_deployment_target("dep-1", late.id, "m/1/x")  # the same device again: counted once
    store.add_deployment(Deployment("dep-2", "m", "2", f"device:{a.id}", now_ms()), {a.id: "m/2/x"})
    counts = {d.id: d.devices_targeted for d in store.list_deployments()}
    assert counts == {"dep-1": 3, "dep-2": 1}


def test_deployment_counts_say_where_each_pointing_device_stands(store: FleetStore) -> None:
    healthy, rolled_back, failed, refused, on_its_way, silent, elsewhere = (
        _enroll(store, name)[0]
        for name in ("healthy", "rolled-back", "failed", "refused", "on-its-way", "silent", "elsewhere")
    )
    target = "m/1/float32.tflite"
    pointed = [healthy, rolled_back, failed, refused, on_its_way, silent]
    store.add_deployment(Deployment("dep-1", "m", "1", "all", now_ms()), {d.id: target for d in pointed})
    store.add_deployment(Deployment("dep-2", "m", "2", "all", now_ms()), {elsewhere.id: "m/2/float32.tflite"})
    _status(store, healthy.id, 1, target)
    store.record_stage(healthy.id, "healthy", "", now_ms())
    _status(store, rolled_back.id, 1, target)
    store.record_stage(rolled_back.id, "rolled_back", "", now_ms())
    _status(store, failed.id, 1, "m/0/float32.tflite")
    store.record_stage(failed.id, "failed", "golden output differs", now_ms())
    _status(store, refused.id, 1, "m/0/float32.tflite", bad_targets=("m/9/x.tflite", target))
    _status(store, on_its_way.id, 1, "m/0/float32.tflite")
    store.record_stage(on_its_way.id, "downloading", "", now_ms())
    # `silent` never reported: pending.
    assert store.deployment_counts() == {
        "dep-1": DeploymentCounts(healthy=2, failed=2, pending=2),
        "dep-2": DeploymentCounts(healthy=0, failed=0, pending=1),
    }


# ---- events and telemetry ---------------------------------------------------------------------------------


def test_events_and_telemetry_are_listed_oldest_first(store: FleetStore) -> None:
    for i in range(3):
        store.add_event(EventRecord("d", "t", "healthy", str(i), i, deployment_id=f"dep-{i % 2}"))
        store.add_telemetry("d", TelemetryReport(at_ms=i, dropped_reports=i))
    assert [e.reason for e in store.list_events("d", limit=2)] == ["1", "2"]
    assert [e.reason for e in store.list_events(deployment_id="dep-0")] == ["0", "2"]
    assert [r.dropped_reports for r in store.list_telemetry("d", 10)] == [0, 1, 2]
    assert [r.at_ms for r in store.list_telemetry("d", 2)] == [1, 2]
    assert store.list_telemetry("other", 10) == []


def test_telemetry_round_trips_as_typed_values(store: FleetStore) -> None:
    report = TelemetryReport(
        at_ms=123,
        health=HealthSample(
            cpu_percent=12.5, memory_used_bytes=2**33, temperature_celsius=51.0, uptime_seconds=9.0
        ),
        inference=(InferenceStats("m/1/float32.tflite", 10, 1, (1.0, 5.0), (3, 4, 3), 31.5, 7.25),),
        dropped_reports=2,
    )
    store.add_telemetry("d", report)
    store.add_telemetry("d", TelemetryReport(at_ms=124))  # no temperature: stays None
    assert store.list_telemetry("d", 10) == [report, TelemetryReport(at_ms=124)]


# ---- SQL only: schema versions ----------------------------------------------------------------------------


def test_a_database_from_before_schema_versions_is_migrated_and_keeps_its_records(
    tmp_path: Path, sql_backend: str
) -> None:
    url = database_url(sql_backend, tmp_path)
    store = open_store(url)
    devices = [_enroll(store, name)[0] for name in ("a", "b", "c")]
    store.add_deployment(Deployment("dep-1", "m", "1", "all", now_ms()), {d.id: "m/1/x" for d in devices})
    store.add_deployment(Deployment("dep-2", "m", "2", "all", now_ms()), {devices[0].id: "m/2/x"})
    store.close()
    engine = sa.create_engine(sqlalchemy_url(url))
    with engine.begin() as conn:  # what version 1 left: no version table, no devices_targeted
        conn.execute(sa.text("DROP TABLE schema_version"))
        conn.execute(sa.text("ALTER TABLE deployments DROP COLUMN devices_targeted"))
    engine.dispose()

    migrated = open_store(url)
    try:
        assert {d.id for d in migrated.list_devices()} == {d.id for d in devices}
        # Version 1 knew only the devices that still point at a deployment.
        assert {d.id: d.devices_targeted for d in migrated.list_deployments()} == {"dep-1": 2, "dep-2": 1}
    finally:
        migrated.close()
    open_store(url).close()  # and it opens again as a version-2 database, nothing migrated twice


def test_a_database_from_a_newer_edgefleet_is_refused_with_what_to_do(
    tmp_path: Path, sql_backend: str
) -> None:
    url = database_url(sql_backend, tmp_path)
    open_store(url).close()
    engine = sa.create_engine(sqlalchemy_url(url))
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE schema_version SET version = version + 1"))
    engine.dispose()
    with pytest.raises(
        SchemaMismatchError, match=f"newer edgefleet \\(this one knows up to {SCHEMA_VERSION}\\)"
    ):
        open_store(url)


def test_telemetry_stored_before_typed_values_still_reads(tmp_path: Path, sql_backend: str) -> None:
    url = database_url(sql_backend, tmp_path)
    open_store(url).close()
    engine = sa.create_engine(sqlalchemy_url(url))
    old = {"at_ms": 5, "health": {"cpu_percent": 3.5, "memory_used_bytes": "1024"}, "dropped_reports": "1"}
    with engine.begin() as conn:  # protobuf's JSON form: 64-bit integers as strings, defaults left out
        telemetry = sa.Table("telemetry", sa.MetaData(), autoload_with=conn)
        conn.execute(telemetry.insert().values(device_id="d", at_ms=5, report=old))
    engine.dispose()
    store = open_store(url)
    try:
        [report] = store.list_telemetry("d", 10)
        assert report == TelemetryReport(5, HealthSample(cpu_percent=3.5, memory_used_bytes=1024), (), 1)
    finally:
        store.close()


def test_an_unknown_database_scheme_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="memory://"):
        open_store("mysql://somewhere/db")


# ---- blobs ------------------------------------------------------------------------------------------------


def test_blob_store_is_content_addressed_and_checks_the_hash(tmp_path: Path) -> None:
    blobs = FilesystemBlobStore(tmp_path / "blobs", max_bytes=100)
    sha = blobs.put_bytes(b"hello")
    assert b"".join(blobs.read(sha, 1, 2)) == b"ello"
    writer = blobs.begin_write()
    writer.write(b"hello")
    with pytest.raises(HashMismatchError):
        writer.commit("0" * 64)
    writer.abort()
    with pytest.raises(InvalidRequestError, match="limit"):
        blobs.put_bytes(b"x" * 101)
    assert not list((tmp_path / "blobs" / "tmp").iterdir())  # no partial files left behind
