"""The deployment ids of a staged rollout's orders, and what each tells a device besides its model
(`RolloutTag`): a wave's deployment, an aborted rollout's order back to the incumbent, and an operator's
retry-failed order (`<wave deployment>-retry<n>`: the wave's failed devices assigned the candidate again,
with `Assignment.retry`, so each may lift the candidate's bad mark once for that order).

The tags live in memory (`Deployments.rollout_tags`); `restore_tags` rebuilds them from the database when
the server starts, so a device that asks after a restart is told what it was told before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from edgefleet.server.deployments import ROLLOUT_KIND, ROLLOUT_ROLLBACK_KIND, RolloutTag
from edgefleet.server.storage.interfaces import FleetStore
from edgefleet.server.storage.records import Deployment
from edgefleet.server.storage.rollout_records import RolloutRecord, RolloutStore

RETRY_MARK = "-retry"


def wave_deployment_id(rollout_id: str, index: int) -> str:
    return f"{rollout_id}-w{index}"


def rollout_order(
    r: RolloutRecord, order_id: str, at_ms: int, *, back: bool = False, reason: str = ""
) -> Deployment:
    """The deployment record of one of `r`'s orders: a wave or a retry-failed order (the candidate), or with
    `back` an order back to what the devices ran before (no one version)."""
    kind = ROLLOUT_ROLLBACK_KIND if back else ROLLOUT_KIND
    version = "" if back else r.version
    return Deployment(order_id, r.model_name, version, f"rollout:{r.id}", at_ms, kind, reason[:500])


def wave_of_retry(deployment_id: str) -> str:
    """The wave deployment a retry-failed order belongs to; "" for any other id."""
    wave, mark, n = deployment_id.rpartition(RETRY_MARK)
    return wave if mark and n.isdigit() else ""


def next_retry_order(wave_deployment: str, known: Iterable[str]) -> str:
    """The wave's next retry-failed order id, counting from 1 over the orders `known` (the tags)."""
    n = 1 + sum(1 for d in known if wave_of_retry(d) == wave_deployment)
    return f"{wave_deployment}{RETRY_MARK}{n}"


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
        elif d.kind == ROLLOUT_KIND and wave_of_retry(d.id) in tags:  # recorded after its wave
            tags[d.id] = dataclasses.replace(tags[wave_of_retry(d.id)], retry=True)
    return tags
