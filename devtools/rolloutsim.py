"""A staged-rollout rig: a real server process, hundreds of simulated devices that obey it and report
telemetry drawn from behaviours the caller chooses per model version, and the operator's calls (the
rollout permit signed as `edgefleet rollout start` signs it).

    rig = await RolloutRig.create(folder, keys, devices=200, behaviours={"3": slow})
    rollout_id = await rig.start("3", waves="20%,100%", soak_s=1)
    status = await rig.wait(rollout_id, lambda s: s.rollout.state == "aborted")

Used by tests/integration/test_rollout_engine.py and the demo's simulated part.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet import signing
from edgefleet.cli.client import Operator
from edgefleet.cli.commands.rollouts import authorize_rollout
from edgefleet.devtools.inprocess import InProcessServer
from edgefleet.devtools.modelgen import build_large_mlp
from edgefleet.devtools.serverprocess import ServerProcess
from edgefleet.devtools.simbehaviour import ModelBehaviour, by_version
from edgefleet.devtools.simdevices import SimDevice, close_all, connect_all, enroll
from edgefleet.v1 import operator_pb2, rollout_pb2, rollout_pb2_grpc

MODEL = "detector"
FAST_SERVER = {
    "telemetry_per_device_per_s": 50.0,
    "telemetry_burst": 100,
    "rollout_tick_seconds": 0.2,
}
# Floors small enough for seconds of soak (a camera fleet's defaults want a day of device-hours).
FAST_GATES = (
    "install-failures.min_finished_devices=10",
    "error-rate.min_calls=1000",
    "latency.min_calls=1000",
    "crash-rate.min_device_hours=0.002",
    "worker-restart-rate.min_device_hours=0.002",
    "drift-top-class.min_calls=1000",
    "drift-top-score.min_calls=1000",
    "shadow-agreement.min_compared_calls=500",
    "shadow-latency.min_calls=500",
)


@dataclass
class RolloutRig:
    server: ServerProcess
    devices: list[SimDevice]
    behaviours: dict[str, ModelBehaviour]
    interval_s: float
    versions: dict[str, str] = field(default_factory=dict)  # version -> float32 target path

    @classmethod
    async def create(
        cls,
        folder: Path,
        keys: signing.KeyFiles,
        *,
        devices: int,
        versions: Sequence[str],
        behaviours: dict[str, ModelBehaviour],
        interval_s: float = 0.5,
        **config: Any,
    ) -> RolloutRig:
        """Starts the server, pushes every version (real TFLite files), enrolls and connects the devices and
        puts them all on `versions[0]` with a plain deployment."""
        server = ServerProcess(folder, keys, **{**FAST_SERVER, **config})
        await asyncio.to_thread(server.start)
        rig = cls(server, [], behaviours, interval_s)
        await rig._populate(devices, versions)
        return rig

    async def _populate(self, devices: int, versions: Sequence[str], model_bytes: int = 64 * 1024) -> None:
        for i, version in enumerate(versions):
            model = build_large_mlp(model_bytes, seed=i)
            self.versions[version] = await asyncio.to_thread(self.server.push_model, model, MODEL, version)
        await self.add_devices(devices, "sim")
        await self.server.deploy(MODEL, versions[0])
        await self.wait_running(versions[0], self.devices)

    async def add_devices(
        self, count: int, prefix: str, group: str = "load", timezones: Sequence[str] = ()
    ) -> list[SimDevice]:
        """Enrolls, connects and starts `count` obeying devices; device i in `timezones[i % len]` if given."""
        new = await enroll(self.server, count, prefix=prefix, group=group, timezones=timezones)
        for d in new:
            d.behave = by_version(self.behaviours)
            d.step_s = 0.02
        await connect_all(new, self.server)
        for d in new:
            d.start_telemetry(self.interval_s)
        self.devices += new
        return new

    async def wait_running(self, version: str, devices: Sequence[SimDevice], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while any(d.current is None or d.current.version != version for d in devices):
            if time.monotonic() > deadline:
                late = [d.id for d in devices if d.current is None or d.current.version != version]
                raise TimeoutError(f"{len(late)} devices do not run {version}: {late[:5]}")
            await asyncio.sleep(0.05)

    async def wait_running_all(self, versions: dict[str, str], timeout: float = 60) -> None:
        """Waits until each device runs the version `versions` names for it (device id -> version)."""
        deadline = time.monotonic() + timeout
        while True:
            wrong = [
                d.id
                for d in self.devices
                if d.id in versions and (d.current is None or d.current.version != versions[d.id])
            ]
            if not wrong:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(wrong)} devices are not back: {wrong[:5]}")
            await asyncio.sleep(0.05)

    def versions_now(self) -> dict[str, str]:
        return {d.id: d.current.version for d in self.devices if d.current is not None}

    def log(self) -> str:
        """Everything the server processes logged (the audit hook logs there without an audit store)."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.server.folder.glob("server-*.log")))

    async def close(self) -> None:
        await close_all(self.devices)
        await self.server.close()

    # ---- the operator ------------------------------------------------------------------------------------

    def operator_args(self) -> argparse.Namespace:
        return argparse.Namespace(
            server=self.server.address,
            insecure_plaintext=False,
            tls_dir=str(self.server.data_dir / "operator"),
            token_file="",
        )

    @property
    def rollouts(self) -> rollout_pb2_grpc.RolloutServiceStub:
        _ = self.server.operator  # opens the operator channel
        assert self.server._operator is not None
        return rollout_pb2_grpc.RolloutServiceStub(self.server._operator)

    def sign_permit(self, rollout_id: str, version: str, selector: str = "all") -> signing.RolloutPermit:
        op = Operator(self.operator_args())
        try:
            signer = signing.load_signer(self.server.keys.targets)
            return authorize_rollout(op, signer, rollout_id, MODEL, version, selector)
        finally:
            op.channel.close()

    async def permit(self, rollout_id: str) -> signing.RolloutPermit | None:
        """The rollout permit the published targets metadata carries for `rollout_id`."""
        reply = await self.server.operator.GetSignedMetadata(
            operator_pb2.GetSignedMetadataRequest(name="targets"), timeout=30
        )
        targets = signing.parse_metadata(reply.content, "targets").signed
        return signing.rollout_permits(targets).get(rollout_id)

    async def start(
        self,
        version: str,
        *,
        waves: str = "20%,100%",
        soak_s: float = 1.0,
        min_devices: int = 5,
        shadow_waves: int = 0,
        gates: Sequence[str] = (),
        windows: Sequence[rollout_pb2.MaintenanceWindow] = (),
        selector: str = "all",
    ) -> str:
        rollout_id = "ro-" + secrets.token_hex(5)
        await asyncio.to_thread(self.sign_permit, rollout_id, version, selector)
        await self.rollouts.StartRollout(
            rollout_pb2.StartRolloutRequest(
                rollout_id=rollout_id,
                model_name=MODEL,
                version=version,
                selector=selector,
                waves=waves,
                soak_seconds=soak_s,
                min_devices=min_devices,
                shadow_waves=shadow_waves,
                gates=[*FAST_GATES, *gates],
                windows=windows,
            ),
            timeout=60,
        )
        return rollout_id

    async def status(self, rollout_id: str) -> rollout_pb2.GetRolloutResponse:
        return await self.rollouts.GetRollout(
            rollout_pb2.GetRolloutRequest(rollout_id=rollout_id), timeout=30, wait_for_ready=True
        )

    async def wait(
        self,
        rollout_id: str,
        done: Callable[[rollout_pb2.GetRolloutResponse], bool],
        timeout: float = 60,
    ) -> rollout_pb2.GetRolloutResponse:
        deadline = time.monotonic() + timeout
        while True:
            status = await self.status(rollout_id)
            if done(status):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"rollout {rollout_id} did not get there: {status}")
            await asyncio.sleep(0.2)

    def on(self, version: str) -> list[SimDevice]:
        return [d for d in self.devices if d.current is not None and d.current.version == version]


@contextlib.asynccontextmanager
async def in_process_rig(
    folder: Path,
    keys: signing.KeyFiles,
    *,
    devices: int,
    versions: Sequence[str],
    behaviours: dict[str, ModelBehaviour],
    **config: Any,
) -> AsyncIterator[tuple[RolloutRig, InProcessServer]]:
    """`RolloutRig.create` with the server in this process (a real grpc.aio server on loopback, real
    SQLite), for tests that must reach into it: hold one database write to force an interleaving."""
    server = await InProcessServer.start(folder, keys, **{**FAST_SERVER, **config})
    # The rig's operator helpers need only the address, keys and folder of a server: this one's.
    handle = ServerProcess(folder, keys)
    handle.port, handle.enroll_port = server.running.port, server.running.enroll_port
    rig = RolloutRig(handle, [], behaviours, interval_s=0.5)
    try:
        await rig._populate(devices, versions, model_bytes=16 * 1024)
        yield rig, server
    finally:
        await rig.close()
        await server.close()
