"""An abort that crosses a device's report of the candidate: the device finishes installing while the
abort decides, so the abort read it as "still installing" and its report was answered before the abort's
order was written. The device must still be ordered back (a RollbackCommand naming the rollout), as
the device that was on the candidate already is.

The server runs in this process (a real grpc.aio server on loopback, real SQLite) so the database write of
the abort's order can be held, as a slow disk holds it, until the device's report has landed: the one
interleaving that, timed by chance, left a device on an aborted candidate about once in four full runs of
test_rollout_engine.py. The devices are simulated ones over mutual TLS; one installs slowly.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_asyncio

from edgefleet import signing
from edgefleet.devtools.inprocess import InProcessServer
from edgefleet.devtools.modelgen import build_large_mlp
from edgefleet.devtools.rolloutsim import FAST_SERVER, MODEL, RolloutRig
from edgefleet.devtools.serverprocess import ServerProcess
from edgefleet.devtools.simbehaviour import ModelBehaviour
from edgefleet.server.storage.interfaces import FleetStore
from edgefleet.server.storage.records import Deployment
from edgefleet.v1 import rollout_pb2


class HeldStore:
    """The engine's store, whose write of one order waits until `ready()` is true (at most `limit_s`)."""

    def __init__(self, store: FleetStore, order_id: str, ready: Any, limit_s: float = 20.0):
        self._store, self._order_id, self._ready, self._limit_s = store, order_id, ready, limit_s
        self.crossed = threading.Event()  # set when the write went ahead with `ready()` true

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def add_deployment(
        self, deployment: Deployment, targets: dict[str, str], rollback_command: str = ""
    ) -> None:
        if deployment.id == self._order_id:  # called in a worker thread: the server's loop runs on
            deadline = time.monotonic() + self._limit_s
            while not self._ready() and time.monotonic() < deadline:
                time.sleep(0.02)
            if self._ready():
                self.crossed.set()
        self._store.add_deployment(deployment, targets, rollback_command)


@pytest_asyncio.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[RolloutRig, InProcessServer]]:
    keys = signing.init_keys(tmp_path / "keys")
    config = {**FAST_SERVER, "rollout_tick_seconds": 0.1}
    server = await InProcessServer.start(tmp_path / "server", keys, **config)
    # The rig's operator helpers need only the address, keys and folder of a server: this one's.
    handle = ServerProcess(tmp_path / "server", keys)
    handle.port, handle.enroll_port = server.running.port, server.running.enroll_port
    good = ModelBehaviour()
    rig = RolloutRig(handle, [], {"1": good, "2": good}, interval_s=0.5)
    try:
        for i, version in enumerate(("1", "2")):
            model = build_large_mlp(16 * 1024, seed=i)
            rig.versions[version] = await asyncio.to_thread(handle.push_model, model, MODEL, version)
        await rig.add_devices(2, "sim")
        await handle.deploy(MODEL, "1")
        await rig.wait_running("1", rig.devices)
        yield rig, server
    finally:
        await rig.close()
        await server.close()


async def test_a_device_that_finishes_installing_while_the_abort_decides_is_ordered_back(
    rig: tuple[RolloutRig, InProcessServer],
) -> None:
    r, server = rig
    fast, device = r.devices
    device.step_s = 1.0  # a slow install: the abort comes while it downloads, after `fast` installed
    rollout_id = await r.start("2", waves="100%", soak_s=600, min_devices=2)
    engine = server.fleet.rollout_engine
    store = engine.store
    candidate = r.versions["2"]

    def reported_candidate() -> bool:  # its status (answered) and its "activated" event both landed
        d = store.get_device(device.id)
        return d.current_target == candidate and d.last_stage == "activated"

    held = HeldStore(store, f"{rollout_id}-rb", reported_candidate)
    engine.store = held  # type: ignore[assignment]

    def one_each(s: rollout_pb2.GetRolloutResponse) -> bool:
        return s.waves[0].device_states["healthy"] == 1 and s.waves[0].device_states["downloading"] == 1

    await r.wait(rollout_id, one_each, timeout=30)
    assert device.current is not None and device.current.version == "1"

    reply = await r.rollouts.AbortRollout(rollout_pb2.AbortRolloutRequest(rollout_id=rollout_id), timeout=60)
    assert reply.rollback_command_id == f"{rollout_id}-rb"
    assert held.crossed.is_set()  # the interleaving happened
    assert "2" in [path.split("/")[1] for path in device.served]  # it did serve the candidate

    await r.wait_running("1", r.devices, timeout=30)
    for d in r.devices:  # both by the abort's own order, naming the rollout
        assert [(c.command_id, c.rollout_id) for c in d.rollbacks] == [(f"{rollout_id}-rb", rollout_id)]
    s = await r.status(rollout_id)
    assert s.rollout.state == "aborted"
