"""The FleetStore contract for device labels, on every backend (memory, SQLite, PostgreSQL when there is
one): labels from the enrollment token, compare-and-swap changes, label selectors answered by the store,
and a version-2 database (before labels) brought up to date with its records."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import database_url

from edgefleet.errors import NotFoundError
from edgefleet.selectors import parse_selector
from edgefleet.server.storage import open_store
from edgefleet.server.storage.interfaces import FleetStore
from edgefleet.server.storage.records import DeviceRecord, now_ms
from edgefleet.server.storage.schema import SCHEMA_VERSION
from edgefleet.server.storage.sql import sqlalchemy_url


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FleetStore]:
    url = "memory://" if request.param == "memory" else database_url(request.param, tmp_path)
    s = open_store(url)
    yield s
    s.close()


def _enroll(store: FleetStore, name: str, group: str = "g", **labels: str) -> DeviceRecord:
    token = f"enr_{name}"
    store.add_enrollment_token(token, group, 1, now_ms() + 60_000, labels)
    found = store.enrollment_token(token)
    assert found is not None and found.labels == labels
    device = DeviceRecord(f"dev-{name}", name, group, now_ms(), labels=found.labels)
    assert store.enroll_device(token, now_ms(), device, f"secret-{name}")
    return device


def test_a_device_keeps_the_labels_it_enrolled_with(store: FleetStore) -> None:
    _enroll(store, "a", site="berlin", camera="v2")
    _enroll(store, "b")
    assert store.get_device("dev-a").labels == {"site": "berlin", "camera": "v2"}
    assert store.get_device("dev-b").labels == {}
    device = store.device_for_token("secret-a")
    assert device is not None and device.labels == {"site": "berlin", "camera": "v2"}
    assert {d.id: d.labels for d in store.list_devices()} == {
        "dev-a": {"site": "berlin", "camera": "v2"},
        "dev-b": {},
    }
    assert [d.labels for d in store.devices_named("a")] == [{"site": "berlin", "camera": "v2"}]


def test_labels_change_only_from_what_the_caller_read(store: FleetStore) -> None:
    _enroll(store, "a", site="berlin")
    assert store.replace_labels("dev-a", {"site": "paris", "cam": "v2"}, {"site": "berlin"})
    assert not store.replace_labels("dev-a", {}, {"site": "berlin"})  # another change came first
    assert store.get_device("dev-a").labels == {"site": "paris", "cam": "v2"}
    assert store.replace_labels("dev-a", {}, {"site": "paris", "cam": "v2"})
    assert store.get_device("dev-a").labels == {}
    with pytest.raises(NotFoundError):
        store.replace_labels("dev-nope", {"a": "b"}, {})


def test_a_copy_handed_out_is_not_the_stored_record(store: FleetStore) -> None:
    _enroll(store, "a", site="berlin")
    device = store.get_device("dev-a")
    device.labels["site"] = "paris"  # type: ignore[index]
    assert store.get_device("dev-a").labels == {"site": "berlin"}


def test_label_selectors_are_answered_by_the_store(store: FleetStore) -> None:
    _enroll(store, "a", "lab", site="berlin", camera="v2")
    _enroll(store, "b", "lab", site="paris", camera="v1")
    _enroll(store, "c", "field", site="berlin")
    _enroll(store, "d", "field")

    def names(text: str) -> str:
        return "".join(d.name for d in store.devices_matching(parse_selector(text)))

    assert names("site=berlin") == "ac"
    assert names("site!=berlin") == "bd"
    assert names("site in (berlin,paris)") == "abc"
    assert names("site notin (paris)") == "acd"
    assert names("camera") == "ab"
    assert names("!camera") == "cd"
    assert names("site=berlin,camera!=v1") == "ac"
    assert names("group:lab,site=berlin") == "a"
    assert names("group:field,!site") == "d"
    assert names("site=berlin,site=paris") == ""
    assert names("site=rome") == ""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_version_2_database_gets_labels_and_keeps_its_records(backend: str, tmp_path: Path) -> None:
    url = database_url(backend, tmp_path)
    store = open_store(url)
    _enroll(store, "a")
    store.add_enrollment_token("enr_unused", "lab", 3, now_ms() + 60_000)
    store.close()
    engine = sa.create_engine(sqlalchemy_url(url))
    with engine.begin() as conn:  # what version 2 left: no label table, tokens without labels
        conn.execute(sa.text("DROP TABLE device_labels"))
        conn.execute(sa.text("DROP TABLE audit_log"))
        conn.execute(sa.text("DROP TABLE audit_head"))
        conn.execute(sa.text("ALTER TABLE enrollment_tokens DROP COLUMN labels"))
        conn.execute(sa.text("UPDATE schema_version SET version = 2"))
    engine.dispose()

    migrated = open_store(url)
    try:
        assert [(d.id, d.labels) for d in migrated.list_devices()] == [("dev-a", {})]
        token = migrated.enrollment_token("enr_unused")
        assert token is not None and (token.group, token.uses_left, token.labels) == ("lab", 3, {})
        assert migrated.replace_labels("dev-a", {"site": "berlin"}, {})
        assert [d.name for d in migrated.devices_matching(parse_selector("site=berlin"))] == ["a"]
        assert migrated.add_audit(1, "operator", "device.label", "dev-a", "{}").seq == 1
    finally:
        migrated.close()
    engine = sa.create_engine(sqlalchemy_url(url))
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT version FROM schema_version")).scalar() == SCHEMA_VERSION
    engine.dispose()


_SELECTORS = [
    "site=berlin", "site!=berlin", "site in (berlin,rome)", "site notin (berlin,rome)", "site", "!site",
    "camera=v1", "camera!=v2", "tier=", "tier!=", "!tier", "group:lab", "group:field,camera",
    "site=berlin,camera!=v1,!tier", "site in (paris),camera notin (v1)", "camera in (v1,v2),site",
]  # fmt: skip


def test_the_store_and_the_pure_matcher_agree_on_every_selector(store: FleetStore) -> None:
    """Deployments ask the store; a device enrolling later is matched by `Selector.matches`: the same
    answers, or a late joiner would get what its neighbours did not."""
    label_sets = [
        {},
        {"site": "berlin"},
        {"site": "rome", "camera": "v1"},
        {"site": "berlin", "camera": "v2", "tier": ""},
        {"site": "paris", "camera": "v2"},
        {"camera": "v1", "tier": "gold"},
        {"site": "berlin", "camera": "v1"},
        {"tier": ""},
    ]
    devices = [
        _enroll(store, f"d{i}", "lab" if i % 2 else "field", **labels) for i, labels in enumerate(label_sets)
    ]
    for text in _SELECTORS:
        selector = parse_selector(text)
        expected = sorted(d.name for d in devices if selector.matches(d.id, d.group, d.labels))
        assert sorted(d.name for d in store.devices_matching(selector)) == expected, text
