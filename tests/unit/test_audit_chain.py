"""The audit hash chain: an intact log verifies; a changed, inserted, removed or reordered entry, and a
log cut short of its head, do not. Evidence of any kind becomes canonical JSON that hashes the same."""

from __future__ import annotations

import dataclasses
import json

from edgefleet.audit_chain import GENESIS, MAX_DETAILS_CHARS, AuditEntry, canonical_details, seal, verify


def _log(n: int) -> list[AuditEntry]:
    entries: list[AuditEntry] = []
    for i in range(1, n + 1):
        previous = entries[-1].sha256 if entries else GENESIS
        entries.append(seal(previous, i, 1000 + i, "operator", "device.label", f"dev-{i}", f'{{"i":{i}}}'))
    return entries


def test_an_intact_log_verifies() -> None:
    log = _log(5)
    assert verify(log, 5, log[-1].sha256) == ""
    assert verify([], 0, GENESIS) == ""


def test_a_changed_entry_is_found() -> None:
    log = _log(5)
    log[2] = dataclasses.replace(log[2], details_json='{"i":99}')
    assert "entry 3 was changed" in verify(log, 5, log[-1].sha256)
    log = _log(5)
    log[1] = dataclasses.replace(log[1], actor="someone-else")
    assert "entry 2 was changed" in verify(log, 5, log[-1].sha256)


def test_a_changed_entry_with_its_hash_recomputed_breaks_the_next_link() -> None:
    log = _log(5)
    forged = seal(log[1].sha256, 3, log[2].at_ms, "operator", "device.label", "dev-3", "{}")
    log[2] = forged
    assert "entry 4 does not follow entry 3" in verify(log, 5, log[-1].sha256)


def test_a_removed_entry_is_found() -> None:
    log = _log(5)
    head = log[-1].sha256
    assert "entry 3 is missing" in verify(log[:2] + log[3:], 5, head)
    assert "entries were removed" in verify(log[:4], 5, head)  # the newest one deleted


def test_reordered_entries_are_found() -> None:
    log = _log(3)
    assert verify([log[0], log[2], log[1]], 3, log[-1].sha256) != ""


def test_details_of_any_kind_become_canonical_json() -> None:
    text = canonical_details({"b": float("nan"), "a": (1, 2), "c": {"z": float("inf")}, "d": object})
    data = json.loads(text)
    assert list(data) == ["a", "b", "c", "d"] and data["a"] == [1, 2] and data["b"] == "nan"
    assert canonical_details(data) == text  # what was stored hashes the same when read back
    huge = json.loads(canonical_details({"x": "y" * (MAX_DETAILS_CHARS + 1)}))
    assert huge["truncated"] is True and len(huge["sha256"]) == 64
