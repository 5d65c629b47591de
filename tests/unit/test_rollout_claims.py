"""Which order steers a device (server/rollouts/claims.py): active rollouts hold their members, control
cohorts included; a late joiner goes to the newest adopting rollout unless a newer plain order names it."""

from __future__ import annotations

import pytest

from edgefleet.errors import ConflictError
from edgefleet.server.rollouts import claims
from edgefleet.server.storage.records import Deployment, DeviceRecord
from edgefleet.server.storage.rollout_records import MemberRecord, RolloutRecord
from edgefleet.server.storage.rollout_sql import SqlRolloutStore


def rollout(rollout_id: str, created_ms: int, state: str, selector: str = "all") -> RolloutRecord:
    return RolloutRecord(rollout_id, rollout_id, "digits", "2", selector, created_ms, "op", "{}", state=state)


def device(device_id: str, group: str = "default", **labels: str) -> DeviceRecord:
    return DeviceRecord(device_id, device_id, group, 0, labels=labels)


def test_active_rollouts_claim_their_canaries_and_their_control_devices() -> None:
    store = SqlRolloutStore.in_memory(lambda ids, since: {})
    for r, state, members in (
        ("ro-run1", "running", [("a", "canary"), ("b", "control")]),
        ("ro-pause1", "paused", [("c", "canary")]),
        ("ro-done1", "completed", [("d", "canary")]),
        ("ro-abort1", "aborted", [("e", "canary")]),
    ):
        store.add_rollout(
            rollout(r, 1, state), [], [MemberRecord(r, d, 0, role, target_path="t") for d, role in members]
        )
    assert claims.claimed(store, ["a", "b", "c", "d", "e", "f"]) == {
        "a": "ro-run1",
        "b": "ro-run1",
        "c": "ro-pause1",
    }
    with pytest.raises(ConflictError) as refused:
        claims.refuse_claimed({"a": "ro-run1", "b": "ro-run1"}, {"a": "cam-a"}, "deploying digits 3")
    assert "2 in rollout ro-run1 (cam-a, b)" in str(refused.value)
    assert "`edgefleet rollout abort ro-run1`" in str(refused.value)
    claims.refuse_claimed({}, {}, "nothing")  # no claim, no refusal


def test_a_late_joiner_goes_to_the_newest_matching_rollout_unless_a_newer_order_names_it() -> None:
    berlin = device("x", site="berlin")
    older = rollout("ro-old1", 100, "completed")
    newer = rollout("ro-new1", 200, "running", "site=berlin")
    paris_only = rollout("ro-paris1", 300, "running", "site=paris")
    stopped = rollout("ro-stop1", 400, "aborted")
    assert claims.adopter(berlin, [older, newer, paris_only, stopped], []) == "ro-new1"
    assert claims.adopter(device("y", site="paris"), [older, newer], []) == "ro-old1"
    deploy = Deployment("dep-1", "digits", "3", "all", 250)
    assert claims.adopter(berlin, [older, newer], [deploy]) == ""
    assert (
        claims.adopter(berlin, [older, newer], [Deployment("dep-0", "digits", "1", "all", 150)]) == "ro-new1"
    )
    assert claims.adopter(berlin, [stopped], []) == ""

    members = [MemberRecord("ro-old1", "x", 0, "canary")]
    later = [DeviceRecord(i, i, "default", 300, revoked=i == "r") for i in ("x", "z", "r")]
    there_at_start = DeviceRecord("left-out", "left-out", "default", 100)  # the plan stopped short of it
    assert [d.id for d in claims.newcomers(older, members, [*later, there_at_start])] == ["z"]
