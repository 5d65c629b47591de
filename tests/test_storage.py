"""The FleetStore contract, run against every backend available here (SQLite always; PostgreSQL when
EDGEFLEET_TEST_POSTGRES_URL names one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import database_url
from edgefleet.server.storage import (
    SCHEMA_VERSION,
    Deployment,
    EventRecord,
    FilesystemBlobStore,
    FleetStore,
    ModelRecord,
    RepoVersions,
    SchemaMismatchError,
    now_ms,
    open_store,
    sqlalchemy_url,
)

from edgefleet.errors import ConflictError, HashMismatchError, InvalidRequestError, NotFoundError


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(backend: str, tmp_path: Path) -> Iterator[FleetStore]:
    s = open_store(database_url(backend, tmp_path))
    yield s
    s.close()


def _model(path: str = "m/1/float32.tflite", sha: str = "a" * 64) -> ModelRecord:
    name, version, _ = path.split("/")
    return ModelRecord(path, name, version, "float32", sha, 10, {"inputs": [], "outputs": []}, now_ms())


def test_enrollment_token_is_consumed_once_per_use(store: FleetStore) -> None:
    token = store.create_enrollment_token("lab", 1, now_ms() + 60_000)
    device, secret = store.enroll(token, "cam", {"runtime": "x"})
    assert device.group == "lab" and store.device_for_token(secret).id == device.id  # type: ignore[union-attr]
    with pytest.raises(InvalidRequestError, match="used up"):
        store.enroll(token, "cam-2", {})


def test_expired_or_unknown_enrollment_token_is_refused(store: FleetStore) -> None:
    token = store.create_enrollment_token("lab", 5, now_ms() - 1)
    for t in (token, "enr_nonsense"):
        with pytest.raises(InvalidRequestError):
            store.enroll(t, "cam", {})


def test_device_updates_round_trip(store: FleetStore) -> None:
    device, _ = store.enroll(store.create_enrollment_token("g", 1, now_ms() + 60_000), "cam", {})
    store.update_device(
        device.id, current={"target_path": "m/1/float32.tflite"}, bad_targets=["x"], last_stage="healthy"
    )
    again = store.get_device(device.id)
    assert again.current == {"target_path": "m/1/float32.tflite"} and again.bad_targets == ["x"]
    with pytest.raises(NotFoundError):
        store.get_device("dev-nope")


def test_model_versions_are_immutable(store: FleetStore) -> None:
    store.add_model(_model())
    with pytest.raises(ConflictError):
        store.add_model(_model(sha="b" * 64))
    store.mark_signed(["m/1/float32.tflite"])
    assert store.get_model("m/1/float32.tflite").signed


def test_metadata_release_is_compare_and_swap(store: FleetStore) -> None:
    start = store.repo_versions()
    store.put_metadata({"1.root": b"r"}, RepoVersions(root=1), start)
    with pytest.raises(ConflictError):
        store.put_metadata({"1.root": b"other"}, RepoVersions(root=1), start)  # lost the race
    assert store.get_metadata("1.root") == b"r"


def test_deployment_sets_desired_targets_atomically(store: FleetStore) -> None:
    a, _ = store.enroll(store.create_enrollment_token("g", 2, now_ms() + 60_000), "a", {})
    store.add_deployment(Deployment("dep-1", "m", "1", "all", now_ms()), {a.id: "m/1/float32.tflite"})
    assert store.get_device(a.id).desired_target == "m/1/float32.tflite"
    store.add_deployment(
        Deployment("rb-1", "", "", "all", now_ms(), kind="rollback"), {a.id: "m/0/float32.tflite"}
    )
    assert store.get_device(a.id).rollback_command == "rb-1"
    assert [d.id for d in store.list_deployments()] == ["dep-1", "rb-1"]


def test_a_deployment_counts_every_device_it_pointed_at_once(store: FleetStore) -> None:
    token = store.create_enrollment_token("g", 3, now_ms() + 60_000)
    a, b, late = (store.enroll(token, name, {})[0] for name in ("a", "b", "late"))
    store.add_deployment(Deployment("dep-1", "m", "1", "all", now_ms()), {a.id: "m/1/x", b.id: "m/1/x"})
    store.add_deployment_target("dep-1", late.id, "m/1/x")
    store.add_deployment_target("dep-1", late.id, "m/1/x")  # the same device again: counted once
    store.add_deployment(Deployment("dep-2", "m", "2", f"device:{a.id}", now_ms()), {a.id: "m/2/x"})
    counts = {d.id: d.devices_targeted for d in store.list_deployments()}
    assert counts == {"dep-1": 3, "dep-2": 1}


def test_events_and_telemetry_are_listed_oldest_first(store: FleetStore) -> None:
    for i in range(3):
        store.add_event(EventRecord("d", "t", "healthy", str(i), i))
        store.add_telemetry("d", i, {"n": i})
    assert [e.reason for e in store.list_events("d", limit=2)] == ["1", "2"]
    assert [r for _, r in store.list_telemetry("d", 10)] == [{"n": 0}, {"n": 1}, {"n": 2}]


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


def test_a_database_from_before_schema_versions_is_migrated_and_keeps_its_records(
    tmp_path: Path, backend: str
) -> None:
    url = database_url(backend, tmp_path)
    store = open_store(url)
    token = store.create_enrollment_token("g", 3, now_ms() + 60_000)
    devices = [store.enroll(token, name, {})[0] for name in ("a", "b", "c")]
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


def test_a_database_from_a_newer_edgefleet_is_refused_with_what_to_do(tmp_path: Path, backend: str) -> None:
    url = database_url(backend, tmp_path)
    open_store(url).close()
    engine = sa.create_engine(sqlalchemy_url(url))
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE schema_version SET version = version + 1"))
    engine.dispose()
    with pytest.raises(
        SchemaMismatchError, match=f"newer edgefleet \\(this one knows up to {SCHEMA_VERSION}\\)"
    ):
        open_store(url)
