"""The FleetStore contract for the audit log, on every backend: entries are appended to one hash chain
(also by threads racing, as servers sharing a database would), listed by time, action and page, and the
interface offers nothing that changes or removes one."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import database_url

from edgefleet.audit_chain import GENESIS, verify
from edgefleet.server.storage import open_store
from edgefleet.server.storage.interfaces import FleetStore


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FleetStore]:
    url = "memory://" if request.param == "memory" else database_url(request.param, tmp_path)
    s = open_store(url)
    yield s
    s.close()


def test_an_empty_log_has_the_genesis_head(store: FleetStore) -> None:
    page = store.list_audit(0, "", 0, 100)
    assert (page.entries, page.head_seq, page.head_sha256) == ([], 0, GENESIS)
    assert verify(page.entries, page.head_seq, page.head_sha256) == ""


def test_entries_form_one_chain_and_are_listed_by_time_action_and_page(store: FleetStore) -> None:
    for i, action in enumerate(["deployment.create", "device.label", "deployment.rollback", "rollout.gate"]):
        entry = store.add_audit(1000 + i, "operator", action, f"s{i}", f'{{"i":{i}}}')
        assert entry.seq == i + 1
    everything = store.list_audit(0, "", 1, 100)
    assert [e.seq for e in everything.entries] == [1, 2, 3, 4] and everything.head_seq == 4
    assert everything.entries[0].previous_sha256 == GENESIS
    assert verify(everything.entries, everything.head_seq, everything.head_sha256) == ""
    assert [e.action for e in store.list_audit(0, "deployment", 0, 100).entries] == [
        "deployment.create",
        "deployment.rollback",
    ]
    assert [e.seq for e in store.list_audit(0, "device.label", 0, 100).entries] == [2]
    assert store.list_audit(0, "deploy", 0, 100).entries == []  # a prefix is whole parts only
    assert [e.seq for e in store.list_audit(1002, "", 0, 100).entries] == [3, 4]
    assert [e.seq for e in store.list_audit(0, "", 0, 2).entries] == [3, 4]  # the newest, oldest first
    assert [e.seq for e in store.list_audit(0, "", 2, 2).entries] == [2, 3]  # a page from seq 2
    assert store.list_audit(0, "", 0, 0).entries == []


def test_racing_appends_never_fork_the_chain(store: FleetStore) -> None:
    def append(worker: int) -> None:
        for i in range(10):
            store.add_audit(i, f"op-{worker}", "device.label", "d", "{}")

    threads = [threading.Thread(target=append, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    page = store.list_audit(0, "", 1, 1000)
    assert len(page.entries) == 40
    assert verify(page.entries, page.head_seq, page.head_sha256) == ""


def test_the_store_offers_only_insert_and_list_for_the_audit_log() -> None:
    audit_methods = {name for name in dir(FleetStore) if "audit" in name}
    assert audit_methods == {"add_audit", "list_audit"}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_servers_on_one_database_append_to_one_chain_that_survives_a_restart(
    backend: str, tmp_path: Path
) -> None:
    url = database_url(backend, tmp_path)
    first, second = open_store(url), open_store(url)
    try:

        def append(store: FleetStore, worker: int) -> None:
            for i in range(15):
                store.add_audit(i, f"op-{worker}", "deployment.create", "dep", "{}")

        threads = [threading.Thread(target=append, args=(s, w)) for w, s in enumerate([first, second] * 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        first.close()
        second.close()
    reopened = open_store(url)
    try:
        reopened.add_audit(99, "operator", "device.revoke", "dev-x", "{}")
        page = reopened.list_audit(0, "", 1, 1000)
        assert len(page.entries) == 61 and page.head_seq == 61
        assert verify(page.entries, page.head_seq, page.head_sha256) == ""
    finally:
        reopened.close()


def test_no_server_code_updates_or_deletes_an_audit_entry() -> None:
    server = Path(__file__).resolve().parents[2] / "server"
    found = [
        f"{path.name}: {line.strip()}"
        for path in server.rglob("*.py")
        for line in path.read_text().splitlines()
        if re.search(r"audit_log\.(update|delete)\(|(UPDATE|DELETE FROM)\s+audit_log", line)
    ]
    assert found == []
