"""The fleet server in a subprocess of its own, for load tests and benchmarks that measure it.

`ServerProcess` runs `serve(ServerConfig(...))` (what `edgefleet server` runs, with whatever ServerConfig
fields the caller chooses) in a subprocess that holds nothing but the server, so its RSS, file descriptors
and threads are measured with psutil (`usage`, `UsageSampler`). It restarts on the ports of its first
start, and holds an operator channel (mutual TLS with the certificate the server wrote) for the calls a
test or benchmark makes as the operator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgefleet import pki, signing
from edgefleet.cli.client import Operator
from edgefleet.cli.publish import push_model
from edgefleet.devtools.background import BackgroundLoop
from edgefleet.v1 import operator_pb2, operator_pb2_grpc

MIB = 2**20

_LAUNCHER = """
import asyncio, json, logging, sys
from pathlib import Path
from edgefleet.server.app import ServerConfig, serve
fields = json.loads(sys.argv[1])
ready = Path(fields.pop("ready_file"))
for name in ("data_dir", "trust_root", "online_key"):
    fields[name] = Path(fields[name])
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
logging.getLogger("apscheduler").setLevel(logging.WARNING)
asyncio.run(serve(ServerConfig(**fields), ready))
"""


@dataclass(frozen=True)
class Usage:
    rss: int
    fds: int
    threads: int
    cpu_s: float = 0.0  # user + system CPU time the process has used so far

    def __str__(self) -> str:
        return f"RSS {self.rss / MIB:.1f} MiB, {self.fds} fds, {self.threads} threads"


class ServerProcess:
    """`serve(ServerConfig(...))` in a subprocess, restartable on the same ports; the operator's channel."""

    def __init__(self, folder: Path, keys: signing.KeyFiles, **config: Any):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.keys = keys
        self.data_dir = folder / "data"
        self.config = config
        self.port = 0
        self.enroll_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._operator: grpc.aio.Channel | None = None

    # -- lifecycle --

    def start(self, timeout: float = 60) -> float:
        """Starts the server (on the ports of the first start, if any) and waits until it serves. Returns
        the time.monotonic() at which it was seen ready."""
        assert self.proc is None
        ready = self.folder / "ready.json"
        ready.unlink(missing_ok=True)
        fields = {
            "data_dir": str(self.data_dir),
            "trust_root": str(self.keys.trust_root),
            "online_key": str(self.keys.online),
            "listen": f"127.0.0.1:{self.port}",
            "enroll_listen": f"127.0.0.1:{self.enroll_port}",
            "ready_file": str(ready),
            **self.config,
        }
        self.starts += 1
        with open(self.folder / f"server-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCHER, json.dumps(fields)],
                cwd=self.folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready in {timeout} s: {self.log_tail()}")
            time.sleep(0.02)
        seen = time.monotonic()
        ports = json.loads(ready.read_text())
        self.port, self.enroll_port = ports["port"], ports["enroll_port"]
        return seen

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        """SIGTERM: a graceful stop (in-flight calls get `grace_seconds`); SIGKILL: a crash."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        finally:
            self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        path = self.folder / f"server-{self.starts}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def usage(self) -> Usage:
        assert self.proc is not None
        p = psutil.Process(self.proc.pid)
        with p.oneshot():
            cpu = p.cpu_times()
            return Usage(p.memory_info().rss, p.num_fds(), p.num_threads(), cpu.user + cpu.system)

    async def close(self) -> None:
        if self._operator is not None:
            await self._operator.close()
            self._operator = None
        await asyncio.to_thread(self.stop)

    # -- addresses and credentials --

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def enroll_address(self) -> str:
        return f"127.0.0.1:{self.enroll_port}"

    @property
    def ca_pem(self) -> bytes:
        return (self.data_dir / "ca" / "ca.crt").read_bytes()

    def operator_credentials(self) -> grpc.ChannelCredentials:
        files = pki.TlsFiles(self.data_dir / "operator")
        return grpc.ssl_channel_credentials(
            files.ca.read_bytes(), files.key.read_bytes(), files.cert.read_bytes()
        )

    @property
    def operator(self) -> operator_pb2_grpc.OperatorServiceStub:
        if self._operator is None:
            self._operator = grpc.aio.secure_channel(self.address, self.operator_credentials())
        return operator_pb2_grpc.OperatorServiceStub(self._operator)

    async def healthy(self, timeout: float = 5) -> grpc.StatusCode:
        """The Health Check's status code on the main port (the operator's mTLS channel)."""
        if self._operator is None:
            _ = self.operator
        assert self._operator is not None
        try:
            reply = await health_pb2_grpc.HealthStub(self._operator).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.aio.AioRpcError as e:
            return e.code()
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        return grpc.StatusCode.OK

    # -- operator actions --

    def push_model(self, data: bytes, name: str, version: str) -> str:
        """Blocking: uploads, signs and publishes the model as `edgefleet model push` does. Returns its
        target path."""
        args = argparse.Namespace(
            server=self.address,
            insecure_plaintext=False,
            tls_dir=str(self.data_dir / "operator"),
            token_file="",
        )
        op = Operator(args)
        try:
            push_model(op, data, name, version, signing.load_signer(self.keys.targets))
        finally:
            op.channel.close()
        return f"{name}/{version}/float32.tflite"

    async def deploy(self, name: str, version: str, selector: str = "all") -> operator_pb2.DeploymentInfo:
        reply = await self.operator.CreateDeployment(
            operator_pb2.CreateDeploymentRequest(model_name=name, version=version, selector=selector),
            timeout=120,
            wait_for_ready=True,
        )
        return reply.deployment

    async def devices(self) -> list[operator_pb2.DeviceInfo]:
        reply = await self.operator.ListDevices(
            operator_pb2.ListDevicesRequest(), timeout=60, wait_for_ready=True
        )
        return list(reply.devices)

    async def wait_connected(
        self, ids: Iterable[str], since_ms: int, timeout: float, poll_s: float = 0.25
    ) -> float:
        """Waits until every device in `ids` holds a control stream whose status the server processed at
        or after `since_ms` (server clock). Returns the time.monotonic() it was seen."""
        wanted = set(ids)
        deadline = time.monotonic() + timeout
        while True:
            infos = await self.devices()
            up = {d.id for d in infos if d.connected and d.last_seen_unix_ms >= since_ms}
            if wanted <= up:
                return time.monotonic()
            if time.monotonic() > deadline:
                missing = sorted(wanted - up)
                raise TimeoutError(f"{len(missing)} of {len(wanted)} devices not connected: {missing[:5]}")
            await asyncio.sleep(poll_s)

    async def wait_disconnected(self, ids: Iterable[str], timeout: float) -> None:
        wanted = set(ids)
        deadline = time.monotonic() + timeout
        while any(d.connected for d in await self.devices() if d.id in wanted):
            if time.monotonic() > deadline:
                raise TimeoutError("devices still connected")
            await asyncio.sleep(0.25)


class UsageSampler(BackgroundLoop):
    """Samples the server's usage every `interval` s in the background; `peak` is the highest RSS seen."""

    def __init__(self, server: ServerProcess, interval: float = 0.05):
        self.server = server
        self.interval = interval
        self.samples: list[Usage] = []

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error, AssertionError):
                self.samples.append(self.server.usage())
            await asyncio.sleep(self.interval)

    @property
    def peak(self) -> Usage:
        return Usage(
            max(s.rss for s in self.samples),
            max(s.fds for s in self.samples),
            max(s.threads for s in self.samples),
            max(s.cpu_s for s in self.samples),
        )


@contextlib.asynccontextmanager
async def server_process(folder: Path, keys: signing.KeyFiles, **config: Any) -> AsyncIterator[ServerProcess]:
    """A started ServerProcess (ServerConfig fields from `config`), stopped and its channel closed on exit."""
    server = ServerProcess(folder, keys, **config)
    try:
        await asyncio.to_thread(server.start)
        yield server
    finally:
        await server.close()
