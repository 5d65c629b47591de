"""A staged rollout's order ids and tags (`server.rollouts.orders`): retry-failed orders are numbered per
wave, and every tag, a retry order's `retry` with it, is rebuilt from the database as a restarted server
does. Also `rules.pending_action`: a device that refused its desired target is told again only on a retry."""

from __future__ import annotations

from edgefleet.server.deployments import ROLLOUT_KIND, ROLLOUT_ROLLBACK_KIND, RolloutTag
from edgefleet.server.rollouts import orders
from edgefleet.server.rules import pending_action
from edgefleet.server.storage import open_store
from edgefleet.server.storage.records import Deployment, DeviceRecord
from edgefleet.server.storage.rollout_records import RolloutRecord, WaveRecord


def test_retry_orders_are_numbered_per_wave_and_name_their_wave() -> None:
    assert orders.next_retry_order("ro-r5f3-w1", []) == "ro-r5f3-w1-retry1"
    known = ["ro-r5f3-w1", "ro-r5f3-w1-retry1", "ro-r5f3-w10-retry1", "ro-r5f3-rb"]
    assert orders.next_retry_order("ro-r5f3-w1", known) == "ro-r5f3-w1-retry2"
    assert orders.wave_of_retry("ro-r5f3-w1-retry12") == "ro-r5f3-w1"
    assert [orders.wave_of_retry(d) for d in ("ro-r5f3-w1", "ro-r5f3-rb", "ro-r5f3-w1-retryx")] == [
        "",
        "",
        "",
    ]


def test_tags_with_retry_orders_are_restored_from_the_database() -> None:
    store = open_store("memory://")
    try:
        record = RolloutRecord("ro-abcd", "n", "detector", "2", "all", 1, "op", "{}")
        waves = [
            WaveRecord("ro-abcd", 0, True, 5, deployment_id="ro-abcd-w0"),
            WaveRecord("ro-abcd", 1, False, 9),
        ]
        store.rollouts().add_rollout(record, waves, [])
        for dep_id, kind in [
            ("ro-abcd-w0", ROLLOUT_KIND),
            ("ro-abcd-w0-retry1", ROLLOUT_KIND),
            ("ro-abcd-w1-retry1", ROLLOUT_KIND),  # its wave never started: no tag to copy
            ("ro-abcd-rb", ROLLOUT_ROLLBACK_KIND),
            ("dep-1", "deploy"),
        ]:
            store.add_deployment(Deployment(dep_id, "detector", "2", "rollout:ro-abcd", 2, kind), {})
        assert orders.restore_tags(store.rollouts(), store) == {
            "ro-abcd-w0": RolloutTag("ro-abcd", shadow=True),
            "ro-abcd-w0-retry1": RolloutTag("ro-abcd", shadow=True, retry=True),
            "ro-abcd-rb": RolloutTag("ro-abcd"),
        }
    finally:
        store.close()


def test_a_refused_target_is_assigned_again_only_on_a_retry() -> None:
    device = DeviceRecord(
        "dev-1", "cam", "default", 1, desired_target="m/2/a.tflite", bad_targets=("m/2/a.tflite",)
    )
    assert pending_action(device) == ""
    assert pending_action(device, retry=True) == "assign"
