"""Rollout orders that cross other requests at the worst moment, forced rather than left to chance.

The server runs in this process (a real grpc.aio server on loopback, real SQLite; `in_process_rig`) so one
database write can be held, as a slow disk holds it, until the other request has landed
(`devtools.heldstore`). The devices are simulated ones over mutual TLS.

- An abort that crosses a device's report of the candidate: the device finishes installing while the abort
  decides, so the abort read it as "still installing" and its report was answered before the abort's order
  was written. Timed by chance, this left a device on an aborted candidate about once in four full runs of
  test_rollout_engine.py.
- A deploy that crosses a rollout start: the deploy found no rollout claiming its devices, and the rollout
  claimed them before the deploy wrote, so both were accepted and the rollout's waves undid the deploy.
- A device that connects while the engine writes its wave's assignments: told at once, it reported healthy
  before the engine cleared its last stage for the new order, and the clearing erased the report (the wave
  then waited for ever on one device; seen once in a fresh-clone CI run).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from edgefleet import signing
from edgefleet.devtools.heldstore import HeldStore
from edgefleet.devtools.inprocess import InProcessServer
from edgefleet.devtools.rolloutsim import FAST_GATES, MODEL, RolloutRig, in_process_rig
from edgefleet.devtools.simbehaviour import ModelBehaviour
from edgefleet.v1 import rollout_pb2

Rig = tuple[RolloutRig, InProcessServer]


@pytest_asyncio.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    keys = signing.init_keys(tmp_path / "keys")
    good = ModelBehaviour()
    async with in_process_rig(
        tmp_path / "server",
        keys,
        devices=2,
        versions=["1", "2", "3"],
        behaviours={"1": good, "2": good, "3": good},
        rollout_tick_seconds=0.1,
    ) as pair:
        yield pair


async def test_a_device_that_finishes_installing_while_the_abort_decides_is_ordered_back(rig: Rig) -> None:
    r, server = rig
    fast, slow = r.devices
    slow.step_s = 3.0  # a slow install: the abort comes while it downloads, after `fast` installed
    rollout_id = await r.start("2", waves="100%", soak_s=600, min_devices=2)
    engine = server.fleet.rollout_engine
    store = engine.store
    candidate = r.versions["2"]

    def reported_candidate() -> bool:  # its status (answered) and its "activated" event both landed
        d = store.get_device(slow.id)
        return d.current_target == candidate and d.last_stage == "activated"

    held = HeldStore(store, "add_deployment", lambda d, *_: d.id == f"{rollout_id}-rb", reported_candidate)
    engine.store = held  # type: ignore[assignment]

    def one_each(s: rollout_pb2.GetRolloutResponse) -> bool:
        return s.waves[0].device_states["healthy"] == 1 and s.waves[0].device_states["downloading"] == 1

    await r.wait(rollout_id, one_each, timeout=30)
    assert slow.current is not None and slow.current.version == "1"

    reply = await r.rollouts.AbortRollout(rollout_pb2.AbortRolloutRequest(rollout_id=rollout_id), timeout=60)
    assert reply.rollback_command_id == f"{rollout_id}-rb"
    assert held.crossed.is_set()  # the interleaving happened: its report came while the write waited
    assert "2" in [path.split("/")[1] for path in slow.served]  # it did serve the candidate

    await r.wait_running("1", r.devices, timeout=30)
    for d in r.devices:  # both by the abort's own order, naming the rollout
        assert [(c.command_id, c.rollout_id) for c in d.rollbacks] == [(f"{rollout_id}-rb", rollout_id)]
    s = await r.status(rollout_id)
    assert s.rollout.state == "aborted"


async def test_a_rollout_start_never_lands_between_a_deploys_claim_check_and_its_write(rig: Rig) -> None:
    r, server = rig
    deployments = server.fleet.deployments
    store = deployments.store

    # The deploy's write waits (5 s at most) for a rollout to exist: a start that got in between would. The
    # start's permit is signed first, so all it does meanwhile is plan and check (milliseconds).
    def rollout_exists() -> bool:
        return bool(store.rollouts().list_rollouts())

    held = HeldStore(store, "add_deployment", lambda d, *_: d.kind == "deploy", rollout_exists, 5.0)
    deployments.store = held  # type: ignore[assignment]
    rollout_id = "ro-crossed"
    await asyncio.to_thread(r.sign_permit, rollout_id, "2")
    start = rollout_pb2.StartRolloutRequest(
        rollout_id=rollout_id, model_name=MODEL, version="2", selector="all", waves="100%", soak_seconds=600,
        min_devices=2, gates=FAST_GATES,
    )  # fmt: skip

    deploy = asyncio.create_task(r.server.deploy(MODEL, "3"))
    assert await asyncio.to_thread(held.waiting.wait, 30), "the write to hold never came"
    await r.rollouts.StartRollout(start, timeout=60)
    deployed = await deploy

    assert not held.ready_at_once.is_set()
    assert not held.crossed.is_set(), "the rollout started while the deploy was between its check and write"
    assert deployed.devices_targeted == 2
    # One after the other: the rollout, which came second, steers both devices.
    await r.wait_running("2", r.devices, timeout=30)
    s = await r.wait(rollout_id, lambda s: s.waves[0].device_states["healthy"] == 2, timeout=30)
    assert s.rollout.state == "running"


async def test_a_device_that_reports_on_its_wave_while_the_wave_is_assigned_counts_as_healthy(
    rig: Rig,
) -> None:
    r, server = rig
    fast, late = r.devices
    await late.stop()  # offline when its wave starts: it is told when it connects, by its status report
    engine = server.fleet.rollout_engine
    store = engine.store
    candidate = r.versions["2"]

    def reported_healthy() -> bool:
        d = store.get_device(late.id)
        return d.current_target == candidate and d.last_stage == "healthy"

    # The engine's write of the wave's assignments waits once `late` is pointed at the candidate, until
    # `late` (connecting meanwhile) has installed it and reported healthy on it.
    held = HeldStore(
        store,
        "add_deployment_target",
        lambda _, device_id, *__: device_id == late.id,
        reported_healthy,
        after=True,
    )
    engine.store = held  # type: ignore[assignment]
    rollout_id = await r.start("2", waves="100%", soak_s=1, min_devices=2)
    assert await asyncio.to_thread(held.waiting.wait, 30), "the write to hold never came"
    late.start()

    await r.wait(rollout_id, lambda s: s.waves[0].device_states["healthy"] == 2, timeout=30)
    assert held.crossed.is_set()  # it reported while the engine was still writing the wave
