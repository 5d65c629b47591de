"""Ordering a rollout's devices back on abort: every member on the candidate gets a rollback order naming
the rollout (devices accept it on the operator's rollout permit), and members still installing or in
shadow are pointed back at what they run, with the same order left pending on them.

A pending rollback order stands until the device obeys it (`rules.pending_rollback`), and a device's status
report tells it what is pending. A member that finishes installing the candidate after the abort is
therefore sent back by its own report, or by the push after the write here when its report came in while
the abort was deciding: whichever of the two writes lands last, the read after it sees both. Members that
were stopped are told to run what they run, so an agent drops a shadow candidate and gives up an install
of the candidate that has not started yet at once.

A function of the engine (its store, deployments and clock), kept apart so engine.py holds the state machine.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgefleet.server.rollouts.orders import rollout_order
from edgefleet.server.rules import pending_rollback
from edgefleet.server.storage.records import DeviceRecord, ModelRecord
from edgefleet.server.streams import AssignmentPush, RollbackPush

if TYPE_CHECKING:
    from edgefleet.server.rollouts.engine import Loaded, RolloutEngine


@dataclass(frozen=True)
class SentBack:
    on_candidate: int  # ordered back from the candidate
    stranded: int  # on (or installing) the candidate with no earlier model to go back to: they stay on it


async def order_back(
    engine: RolloutEngine, ro: Loaded, devices: dict[str, DeviceRecord], order_id: str, reason: str
) -> SentBack:
    """Orders every member on the candidate back to its previous model (none when `order_id` is "") and
    points members still installing, or in shadow, back at what they run."""
    r = ro.rollout
    candidates = {m.target_path for m in ro.members if m.role == "canary" and m.target_path}
    back: dict[str, str] = {}
    on_candidate = stranded = 0
    for m in ro.members:
        device = devices.get(m.device_id)
        if m.role != "canary" or device is None:
            continue
        if not m.assigned_ms and not device.desired_deployment.startswith(f"{r.id}-"):
            continue  # never told: a later wave's (a shadow wave's moved members and retried ones were)
        on_it = device.current_target in candidates
        if on_it and device.previous is not None:
            if order_id:
                back[device.id] = device.previous.target_path
                on_candidate += 1
        elif on_it or (device.current is None and device.desired_target in candidates):
            stranded += 1  # nothing earlier to go back to: it stays on the candidate
        elif device.current is not None and device.desired_target in candidates:
            back[device.id] = device.current_target  # still installing, or in shadow: stop it there
    if not back:
        return SentBack(on_candidate, stranded)
    rollback_command = order_id  # left pending on installing members too: they may finish the candidate
    order_id = order_id or f"{r.id}-stop"
    order = rollout_order(r, order_id, engine.clock(), back=True, reason=reason)
    engine.tag(order_id, r.id, False)
    await asyncio.to_thread(engine.store.add_deployment, order, back, rollback_command)
    # Read again after the write: a device whose report of the candidate landed while the abort decided
    # was told nothing by that report (its order was not written yet) and is told now.
    now = {d.id: d for d in await asyncio.to_thread(engine.store.list_devices)}
    models: dict[str, ModelRecord] = {}
    streams = engine.deployments.streams
    for device_id, target in back.items():
        device = now.get(device_id)
        if device is None:
            continue
        if rollback_command and pending_rollback(device) == rollback_command:
            streams.push(device_id, RollbackPush(rollback_command, reason[:500], r.id))
        elif device.current_target == target and device.desired_target == target:
            if target not in models:
                models[target] = await engine.deployments.repository.model(target)
            streams.push(device_id, AssignmentPush(models[target], order_id, False, r.id))
    return SentBack(on_candidate, stranded)
