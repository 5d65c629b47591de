"""The deployment ids of a staged rollout's orders, and what each tells a device besides its model
(`RolloutTag`): a wave's deployment, and an aborted rollout's order back to the incumbent.

The tags live in memory (`Deployments.rollout_tags`); `restore_tags` rebuilds them from the database when
the server starts, so a device that asks after a restart is told what it was told before.
"""

from __future__ import annotations

from edgefleet.server.deployments import ROLLOUT_ROLLBACK_KIND, RolloutTag
from edgefleet.server.storage.interfaces import FleetStore
from edgefleet.server.storage.rollout_records import RolloutStore


def wave_deployment_id(rollout_id: str, index: int) -> str:
    return f"{rollout_id}-w{index}"


def restore_tags(rollouts: RolloutStore, store: FleetStore) -> dict[str, RolloutTag]:
    """Every recorded rollout's tags, by deployment id (blocking: run it in a thread)."""
    tags: dict[str, RolloutTag] = {}
    for r in rollouts.list_rollouts():
        for w in rollouts.waves(r.id):
            if w.deployment_id:
                tags[w.deployment_id] = RolloutTag(r.id, w.shadow)
    for d in store.list_deployments():
        if d.kind == ROLLOUT_ROLLBACK_KIND:
            tags[d.id] = RolloutTag(d.selector.removeprefix("rollout:"), False)
    return tags
