"""Ordering a rollout's devices back: on abort, every member on the candidate gets a rollback order naming
the rollout (devices accept it on the operator's rollout permit) and members still installing are pointed
back at what they run; for a while after, members that finished installing anyway are swept back too.

Functions of the engine (its store, deployments and clock), kept apart so engine.py holds the state machine.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from edgefleet.server.rollouts.orders import rollout_order
from edgefleet.server.storage.records import DeviceRecord
from edgefleet.server.streams import RollbackPush

if TYPE_CHECKING:
    from edgefleet.server.rollouts.engine import Loaded, RolloutEngine


async def order_back(
    engine: RolloutEngine,
    ro: Loaded,
    devices: dict[str, DeviceRecord],
    order_id: str,
    reason: str,
    *,
    installing_too: bool,
) -> list[str]:
    """Orders every member on the candidate back to its previous model (none when `order_id` is "")
    and, with `installing_too`, points members still installing back at what they run. Returns the
    devices ordered back."""
    r = ro.rollout
    candidates = {m.target_path for m in ro.members if m.role == "canary" and m.target_path}
    back: dict[str, str] = {}
    on_candidate: list[str] = []
    for m in ro.members:
        device = devices.get(m.device_id)
        if m.role != "canary" or not m.assigned_ms or device is None:
            continue
        if not installing_too and not device.desired_deployment.startswith(f"{r.id}-"):
            continue  # a sweep: a newer order (a deploy, another rollout) steers it now
        if device.current_target in candidates and device.previous is not None:
            if order_id and not device.rollback_command.startswith(f"{r.id}-rb"):
                back[device.id] = device.previous.target_path
                on_candidate.append(device.id)
        elif installing_too and device.current is not None and device.desired_target in candidates:
            back[device.id] = device.current_target  # still installing (or in shadow): stop it there
    if not back:
        return []
    order_id = order_id or f"{r.id}-stop"
    order = rollout_order(r, order_id, engine.clock(), back=True, reason=reason)
    engine.tag(order_id, r.id, False)
    await asyncio.to_thread(engine.store.add_deployment, order, back, order_id if on_candidate else "")
    for device_id in on_candidate:
        engine.deployments.streams.push(device_id, RollbackPush(order_id, reason[:500], r.id))
    return on_candidate


async def sweep(engine: RolloutEngine, ro: Loaded, devices: dict[str, DeviceRecord]) -> None:
    """After an abort with rollback, a device that finished installing the candidate anyway (it was
    mid-install) is ordered back too, by an order of its own."""
    r = ro.rollout
    order_id = f"{r.id}-rb{engine.clock()}"
    ordered = await order_back(engine, ro, devices, order_id, r.reason, installing_too=False)
    if ordered:
        await engine.note(
            r, f"{len(ordered)} devices that finished installing after the abort ordered back", {}
        )
