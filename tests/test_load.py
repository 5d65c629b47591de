"""Load: a simulated fleet against one real server process (docs/reliability.md, "Load").

The server runs in a subprocess of its own (`server.app.serve`, what `edgefleet server` runs, with
ServerConfig fields a test chooses), so its RSS, file descriptors and threads are measured with psutil on a
process that holds nothing but the server. The devices are simulated in this process: each one is a real
enrolled device (Enroll over the enrollment port with a CSR of its own key, then an mTLS channel with the
certificate the server issued), with a channel (TCP + TLS connection) of its own and a Connect control
stream, reconnecting with the agent's own jittered exponential `Backoff` as `edgefleet.agent.control` does.

The same simulation, at a larger scale and printing figures instead of asserting, is `bench/fleet_load.py`.

The telemetry flood ("one device flooding telemetry is rate-limited") is covered by
tests/test_security.py::test_device_flooding_telemetry_is_rate_limited_and_others_are_not and not repeated
here; the rest of that line (the agent's bounded queue drops oldest first and counts the drops) is the last
test below. bench/fleet_load.py measures what a flood costs the other devices at scale.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from edgefleet.agent.connection import Backoff
from edgefleet.agent.telemetry import Outbox
from edgefleet.server.storage.records import now_ms
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgefleet import cli, pki, signing
from edgefleet.modelgen import build_large_mlp
from edgefleet.v1 import common_pb2, device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
OK = grpc.StatusCode.OK
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

CAPABILITIES = common_pb2.Capabilities(
    runtime="ai-edge-litert",
    runtime_version="2.0.0",
    cpu_arch="x86_64",
    cpu_count=4,
    memory_total_bytes=2**31,
    memory_available_bytes=2**30,
    disk_free_bytes=2**34,
    hardware_class="load-sim",
)

# What the agent's channel uses (edgefleet.agent.connection.open_channel), plus a subchannel pool of its
# own so that every simulated device really has a TCP connection (and a TLS session) of its own.
DEVICE_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 8 * 2**20),
    ("grpc.use_local_subchannel_pool", 1),
]
AGENT_BACKOFF_INITIAL_S = 0.5  # edgefleet.agent.config.AgentConfig defaults
AGENT_BACKOFF_MAX_S = 30.0


# ---- the server, in a process of its own ------------------------------------------------------------------

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
                cwd=ROOT,
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
        return OK

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
        op = cli.Operator(args)
        try:
            cli.push_model(op, data, name, version, signing.load_signer(self.keys.targets))
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


class UsageSampler:
    """Samples the server's usage every `interval` s in the background; `peak` is the highest RSS seen."""

    def __init__(self, server: ServerProcess, interval: float = 0.05):
        self.server = server
        self.interval = interval
        self.samples: list[Usage] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error, AssertionError):
                self.samples.append(self.server.usage())
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> UsageSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    @property
    def peak(self) -> Usage:
        return Usage(
            max(s.rss for s in self.samples),
            max(s.fds for s in self.samples),
            max(s.threads for s in self.samples),
            max(s.cpu_s for s in self.samples),
        )


# ---- simulated devices ------------------------------------------------------------------------------------


@dataclass
class SimDevice:
    """A real enrolled device without the agent: its own mTLS channel and a Connect control stream that
    reports its status first (with a sequence that increases across reconnects) and then stays open,
    reconnecting with the agent's `Backoff` (reset when a message arrives, as the agent does)."""

    id: str
    name: str
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    address: str
    sequence: int = 0
    attempts: list[float] = field(default_factory=list)  # time.monotonic() of each Connect call
    ends: list[tuple[float, grpc.StatusCode, str]] = field(default_factory=list)  # how streams ended
    assignments: list[tuple[float, str]] = field(default_factory=list)  # (received at, deployment id)
    channel_options: list[tuple[str, Any]] = field(default_factory=list)  # added to the agent's

    def __post_init__(self) -> None:
        self.backoff = Backoff(AGENT_BACKOFF_INITIAL_S, AGENT_BACKOFF_MAX_S)
        self.channel: grpc.aio.Channel | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._call: Any = None

    @property
    def stub(self) -> device_pb2_grpc.DeviceServiceStub:
        if self.channel is None:
            credentials = grpc.ssl_channel_credentials(self.ca_pem, self.key_pem, self.cert_pem)
            options = DEVICE_CHANNEL_OPTIONS + list(self.channel_options)
            self.channel = grpc.aio.secure_channel(self.address, credentials, options=options)
        return device_pb2_grpc.DeviceServiceStub(self.channel)

    # -- the control stream --

    def start(self) -> None:
        assert self._task is None or self._task.done()
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._connection_loop())

    async def stop(self) -> None:
        """Ends the control stream (a clean close, as an agent that stops) and the reconnect loop."""
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        if self._task is not None:
            await self._task
            self._task = None

    async def close(self) -> None:
        await self.stop()
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    async def _connection_loop(self) -> None:
        while not self._stop.is_set():
            self.attempts.append(time.monotonic())
            code, details = OK, ""
            try:
                await self._stream()
            except grpc.aio.AioRpcError as e:
                code, details = e.code(), e.details() or ""
            except asyncio.CancelledError:
                if not self._stop.is_set():
                    raise
                code = grpc.StatusCode.CANCELLED
            self.ends.append((time.monotonic(), code, details))
            if self._stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.backoff.next())

    async def _stream(self) -> None:
        stop = self._stop

        async def outgoing() -> AsyncIterator[device_pb2.DeviceMessage]:
            self.sequence += 1
            yield device_pb2.DeviceMessage(
                status=device_pb2.DeviceStatus(
                    capabilities=CAPABILITIES,
                    agent_version="load-sim",
                    sent_at_unix_ms=now_ms(),
                    sequence=self.sequence,
                )
            )
            await stop.wait()

        self._call = self.stub.Connect(outgoing())
        try:
            async for message in self._call:
                self.backoff.reset()
                if message.WhichOneof("kind") == "assignment":
                    self.assignments.append((time.monotonic(), message.assignment.deployment_id))
        finally:
            self._call = None  # a finished call still holds its channel's connection open

    def first_assignment(self, deployment_id: str, after: float = 0.0) -> float | None:
        return next((t for t, d in self.assignments if d == deployment_id and t >= after), None)

    # -- other calls --

    async def report_telemetry(self, timeout: float = 10) -> grpc.StatusCode:
        request = device_pb2.ReportTelemetryRequest(
            report=device_pb2.TelemetryReport(
                at_unix_ms=now_ms(), health=common_pb2.HealthSample(cpu_percent=5, memory_used_bytes=2**20)
            )
        )
        try:
            await self.stub.ReportTelemetry(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            return e.code()
        return OK

    async def get_assignment(self, timeout: float = 10) -> grpc.StatusCode:
        try:
            await self.stub.GetAssignment(device_pb2.GetAssignmentRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            return e.code()
        return OK

    async def download(self, target_path: str, timeout: float = 60) -> bytes:
        data = bytearray()
        call = self.stub.DownloadModel(
            device_pb2.DownloadModelRequest(target_path=target_path), timeout=timeout
        )
        async for chunk in call:
            assert chunk.offset == len(data)
            data += chunk.data
        return bytes(data)


async def enroll(
    server: ServerProcess, count: int, *, prefix: str = "sim", concurrency: int = 16
) -> list[SimDevice]:
    """Enrolls `count` devices for real: one token with `count` uses, then Enroll with a fresh key's CSR
    per device over the enrollment port (server-authenticated TLS), `concurrency` at a time."""
    token = (
        await server.operator.CreateEnrollmentToken(
            operator_pb2.CreateEnrollmentTokenRequest(group="load", uses=count),
            timeout=30,
            wait_for_ready=True,
        )
    ).token
    ca_pem = server.ca_pem
    channel = grpc.aio.secure_channel(server.enroll_address, grpc.ssl_channel_credentials(ca_pem))
    stub = device_pb2_grpc.DeviceServiceStub(channel)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> SimDevice:
        name = f"{prefix}-{i}"
        key = pki.new_key()
        request = device_pb2.EnrollRequest(
            enrollment_token=token,
            device_name=name,
            capabilities=CAPABILITIES,
            csr_pem=pki.make_csr(key, name),
        )
        async with gate:
            for attempt in range(5):
                try:
                    reply = await stub.Enroll(request, timeout=30)
                    break
                except grpc.aio.AioRpcError as e:  # a busy database answers UNAVAILABLE: retry
                    if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == 4:
                        raise
                    await asyncio.sleep(0.2 * 2**attempt)
        return SimDevice(
            reply.device_id, name, pki.key_pem(key), reply.certificate_pem, ca_pem, server.address
        )

    try:
        return list(await asyncio.gather(*(one(i) for i in range(count))))
    finally:
        await channel.close()


async def connect_all(devices: Sequence[SimDevice], server: ServerProcess, timeout: float = 60) -> float:
    """Starts every device's control stream; returns the seconds until the server had them all."""
    since = now_ms()
    started = time.monotonic()
    for device in devices:
        device.start()
    await server.wait_connected((d.id for d in devices), since, timeout)
    return time.monotonic() - started


async def close_all(devices: Sequence[SimDevice]) -> None:
    await asyncio.gather(*(d.close() for d in devices), return_exceptions=True)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def busiest_window(times: Sequence[float], window: float) -> int:
    """The most events in any window of `window` seconds."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(ordered):
        while t - ordered[start] > window:
            start += 1
        best = max(best, end - start + 1)
    return best


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """Moves every object that exists to the permanent generation. One process simulating hundreds of
    devices must not stall all of them at once in a full collection (a real device has a process of its
    own): without this, a gen-2 collection of ~0.8 s with 2,000 devices fires all their backoff timers
    together afterwards, a burst the devices would never make."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class LoopLag:
    """The longest this process's event loop was late for a 10 ms tick: the simulation's own stalls."""

    def __init__(self) -> None:
        self.max = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            asked = time.monotonic()
            await asyncio.sleep(0.01)
            self.max = max(self.max, time.monotonic() - asked - 0.01)

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def status_times(server: ServerProcess) -> dict[str, float]:
    """When the server last processed each device's status (`last_seen`), on this process's monotonic clock."""
    offset = time.time() - time.monotonic()
    return {d.id: d.last_seen_unix_ms / 1000 - offset for d in await server.devices()}


@dataclass
class RestartFigures:
    """How a fleet came back after a server restart (times in s)."""

    ready_after: float  # SIGTERM -> the new process serves
    cuts: list[float]  # SIGTERM -> each device's stream ended
    first_retries: list[float]  # each device's stream end -> its first try to reconnect
    tries: list[int]  # tries per device from its stream's end until it was back
    tries_bound: list[int]  # the most an exponential backoff allows in that time
    backs: list[float]  # ready -> the device received the assignment on its new stream
    arrivals: list[float]  # ready -> the new server processed the device's status
    codes: collections.Counter[str]  # how the failed tries ended

    @classmethod
    def of(
        cls,
        devices: Sequence[SimDevice],
        deployment_id: str,
        stopped: float,
        ready: float,
        seen: dict[str, float],
    ) -> RestartFigures:
        r = cls(ready - stopped, [], [], [], [], [], [], collections.Counter())
        for d in devices:
            ends = [(t, code) for t, code, _ in d.ends if t >= stopped]
            assert ends, d.id
            cut = ends[0][0]
            back = d.first_assignment(deployment_id, cut)
            assert back is not None, d.id
            tries = [t for t in d.attempts if cut < t <= back]
            r.cuts.append(cut - stopped)
            r.first_retries.append(tries[0] - cut)
            r.tries.append(len(tries))
            # Backoff delays are at least 0.25 s * 2^k (initial 0.5 s, jitter x0.5..1.5), so k tries take
            # at least 0.25 * (2^k - 1) s.
            r.tries_bound.append(math.floor(math.log2((back - cut) / (AGENT_BACKOFF_INITIAL_S / 2) + 1)) + 1)
            r.backs.append(back - ready)
            r.arrivals.append(seen[d.id] - ready)
            r.codes.update(code.name for t, code in ends if t < back)
        return r

    def __str__(self) -> str:
        def spread(values: Sequence[float]) -> str:
            return (
                " / ".join(f"{percentile(values, q):.2f}" for q in (10, 50, 90)) + f" / {max(values):.2f} s"
            )

        n = len(self.cuts)
        return (
            f"{n} streams cut {min(self.cuts):.2f} .. {max(self.cuts):.2f} s after SIGTERM; new server ready "
            f"{self.ready_after:.2f} s after it\n"
            f"first retry after the cut p10 / p50 / p90 / max: {spread(self.first_retries)}\n"
            f"statuses processed by the new server, after ready: {spread(self.arrivals)}; busiest 100 ms "
            f"{busiest_window(self.arrivals, 0.1)}, busiest 1 s {busiest_window(self.arrivals, 1.0)} devices\n"
            f"assignment received again, after ready: {spread(self.backs)}\n"
            f"tries per device: {dict(sorted(collections.Counter(self.tries).items()))}; failed tries ended "
            f"{dict(self.codes)}"
        )


# ---- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> signing.KeyFiles:
    return signing.init_keys(tmp_path_factory.mktemp("load-keys"))


@pytest.fixture(scope="module")
def model() -> bytes:
    """A real ~8 MiB TFLite model (random float32 weights: compresses as poorly as a trained one)."""
    return build_large_mlp(8 * MIB)


@contextlib.asynccontextmanager
async def running(folder: Path, keys: signing.KeyFiles, **config: Any) -> AsyncIterator[ServerProcess]:
    server = ServerProcess(folder, keys, **config)
    try:
        await asyncio.to_thread(server.start)
        yield server
    finally:
        await server.close()


async def wait_assigned(
    devices: Sequence[SimDevice], deployment_id: str, after: float, timeout: float
) -> None:
    """Waits until every device received an Assignment of `deployment_id` on its stream at or after `after`."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [d.id for d in devices if d.first_assignment(deployment_id, after) is None]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(missing)} of {len(devices)} devices got no assignment: {missing[:5]}")
        await asyncio.sleep(0.02)


async def wait_back(devices: Sequence[SimDevice], deployment_id: str, stopped: float, timeout: float) -> None:
    """Waits until every device's stream ended after `stopped` and it then received `deployment_id` again."""
    deadline = time.monotonic() + timeout
    while True:
        missing = []
        for d in devices:
            cut = next((t for t, _, _ in d.ends if t >= stopped), None)
            if cut is None or d.first_assignment(deployment_id, cut) is None:
                missing.append(d.id)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(missing)} of {len(devices)} devices are not back: {missing[:5]}")
        await asyncio.sleep(0.05)


# ---- bounded memory, file descriptors and threads under many control streams ------------------------------


async def test_hundreds_of_control_streams_keep_server_memory_fds_and_threads_bounded_and_a_deployment_reaches_every_device(
    tmp_path: Path, keys: signing.KeyFiles, model: bytes
) -> None:
    """Thousands of simulated devices on one server process: bounded memory, file descriptors and threads.

    400 devices hold control streams: the server pays a bounded amount of memory per device, one socket per
    device and no thread per device; a deployment reaches every stream; when the devices go away their
    sockets are released, and a second fleet-wide reconnect costs (almost) nothing more than the first."""
    n = 400
    async with asyncio.timeout(90), running(tmp_path, keys) as server:
        devices = await enroll(server, n)
        try:
            idle = server.usage()
            await connect_all(devices, server)
            await asyncio.sleep(1)  # let the handlers settle
            streams = server.usage()
            per_device = (streams.rss - idle.rss) / n
            print(f"\nidle: {idle}; {n} streams: {streams}; {per_device / 1024:.0f} KiB per device")
            assert per_device < 256 * 1024, (
                f"{per_device / 1024:.0f} KiB of server memory per connected device"
            )
            assert streams.fds - idle.fds <= n + 16, f"{streams.fds - idle.fds} fds for {n} devices"
            assert streams.threads - idle.threads <= 4, (
                f"threads grew from {idle.threads} to {streams.threads}"
            )

            await asyncio.to_thread(server.push_model, model, "load", "1")
            started = time.monotonic()
            async with UsageSampler(server) as sampler:
                deployment = await server.deploy("load", "1")
                await wait_assigned(devices, deployment.id, started, timeout=30)
            fan_out = max(d.first_assignment(deployment.id) or math.inf for d in devices) - started
            print(f"deployment to {n} streams: {fan_out:.2f} s; peak during it: {sampler.peak}")
            assert deployment.devices_targeted == n and deployment.devices_notified == n, deployment
            assert all(d.assignments[-1][1] == deployment.id for d in devices)
            assert fan_out < 15, fan_out
            assert sampler.peak.rss - streams.rss < 64 * MIB, sampler.peak

            await close_all(devices)  # every device goes away: its socket must be released
            await server.wait_disconnected((d.id for d in devices), timeout=30)
            await asyncio.sleep(1)
            gone = server.usage()
            print(f"after the {n} devices left: {gone}")
            assert gone.fds <= idle.fds + 4, f"{gone.fds - idle.fds} fds still held after every device left"

            # All of them again, on new connections; the assignment is still pending, so it comes again.
            reconnected = time.monotonic()
            await connect_all(devices, server)
            await wait_assigned(devices, deployment.id, reconnected, timeout=30)
            await asyncio.sleep(1)
            again = server.usage()
            print(f"{n} streams again: {again}")
            assert again.fds - idle.fds <= n + 16
            # The first round grew the heap for n connections; the second reuses it (no per-connect leak).
            first_round = streams.rss - idle.rss
            assert again.rss - max(streams.rss, gone.rss) < max(0.25 * first_round, 16 * MIB), (
                streams,
                again,
            )
        finally:
            await close_all(devices)


# ---- overload ---------------------------------------------------------------------------------------------

# grpc/grpc#36066: when the server ends a client-streaming call while a request write is in flight, the aio
# client replaces the server's status with its own INTERNAL "Internal error from Core" (see
# tests/rpc_harness.py `call`). That status never left the server.
CLIENT_SIDE_INTERNAL = (grpc.StatusCode.INTERNAL, "Internal error from Core")


async def test_overload_is_refused_with_resource_exhausted_and_the_server_recovers(
    tmp_path: Path, keys: signing.KeyFiles
) -> None:
    """Overload answers RESOURCE_EXHAUSTED, not out-of-memory.

    With room for 50 calls at once (45 control streams and 5 more), 45 devices hold control streams, 15 more
    try to connect and 2,000 calls
    arrive at once: what does not fit is refused at once with RESOURCE_EXHAUSTED (nothing hangs, no other
    status, the server's memory barely moves), and once load drops the server serves everyone again: the
    refused devices get in by backing off and retrying, as the agent does."""
    limit = 50
    config = {"max_connected_devices": limit - 5, "rpc_headroom": 5}
    async with asyncio.timeout(90), running(tmp_path, keys, **config) as server:
        devices = await enroll(server, 60)
        holders, late = devices[:45], devices[45:]
        try:
            await connect_all(holders, server)
            loaded = server.usage()
            async with UsageSampler(server) as sampler:
                for device in late:
                    device.start()
                await asyncio.sleep(0.5)
                started = time.monotonic()
                burst = await asyncio.gather(
                    *(devices[i % len(devices)].get_assignment(timeout=30) for i in range(2000))
                )
                burst_s = time.monotonic() - started
                health = await server.healthy()
            counts = collections.Counter(burst)
            print(
                f"\n2000 calls over a limit of {limit} in {burst_s:.2f} s: {dict(counts)}; peak {sampler.peak}"
            )
            # Every answer is a clean one a device retries: RESOURCE_EXHAUSTED, or UNAVAILABLE when the
            # database is what is busy (its write lock waits are bounded). Never INTERNAL or a hang.
            assert set(counts) <= {OK, EXHAUSTED, grpc.StatusCode.UNAVAILABLE}, counts
            # What does not fit is refused at once, or waits its turn on its own connection (32 streams
            # each): the server never takes on more than it has room for.
            assert counts[EXHAUSTED] > 0, counts
            assert burst_s < 20, burst_s  # refused at once, not queued until a deadline
            refusals = [(code, details) for d in late for _, code, details in d.ends]
            assert refusals, "no late device was refused"
            # A late device's stream may also be refused by HTTP/2 itself: its own connection carries its
            # share of the burst, over the 32-streams-per-connection cap, and a stream can be reset with
            # REFUSED_STREAM (code 7) before any handler ran. gRPC reports that as UNAVAILABLE, which the
            # agent retries with backoff like the others.
            assert all(
                (code, details) == CLIENT_SIDE_INTERNAL
                or code == EXHAUSTED
                or (code == grpc.StatusCode.UNAVAILABLE and "error code 7" in details)
                for code, details in refusals
            ), collections.Counter(refusals)
            assert health in (OK, EXHAUSTED), health
            assert server.alive(), server.log_tail()
            assert sampler.peak.rss - loaded.rss < 96 * MIB, (loaded, sampler.peak)
            assert sampler.peak.threads - loaded.threads <= 4, (loaded, sampler.peak)

            # Load drops: 30 devices go away. The server answers again at once, and every refused device
            # gets its control stream on a later try.
            released = time.monotonic()
            await asyncio.gather(*(d.stop() for d in holders[:30]))
            while await server.healthy() != OK:
                assert time.monotonic() - released < 5, "the server did not recover"
                await asyncio.sleep(0.05)
            print(f"serving again {time.monotonic() - released:.2f} s after load dropped")
            await server.wait_connected((d.id for d in late), 0, timeout=45)
            for device in devices:  # one at a time: well within the limit
                assert await device.get_assignment() == OK
            assert server.alive()
        finally:
            await close_all(devices)


# ---- restart under the whole fleet ------------------------------------------------------------------------


async def test_server_restart_under_the_fleet_reconnects_with_jittered_backoff_without_a_stampede(
    tmp_path: Path, keys: signing.KeyFiles, model: bytes
) -> None:
    """Server restart under the whole fleet: agents reconnect with jittered exponential backoff, no stampede.

    300 devices with a pending assignment hold control streams; the server is stopped gracefully (SIGTERM,
    1 s grace) and started again on the same ports. The server cuts every stream at the same instant, so
    only the devices' backoff can spread the reconnects: their retries are jittered (not in lockstep),
    their number grows only logarithmically with the outage (exponential, no hot loop), the new server sees
    the statuses arrive spread out rather than in one burst, and every device is back (the server pushes
    the assignment again on its new stream) within a bound."""
    n = 300
    async with asyncio.timeout(100), running(tmp_path, keys, grace_seconds=1.0) as server:
        devices = await enroll(server, n)
        try:
            await connect_all(devices, server)
            await asyncio.to_thread(server.push_model, model, "load", "1")
            deployment = await server.deploy("load", "1")
            await wait_assigned(devices, deployment.id, 0, timeout=30)
            with quiet_gc():
                async with LoopLag() as lag:
                    stopped = time.monotonic()
                    await asyncio.to_thread(server.stop)  # SIGTERM
                    ready = await asyncio.to_thread(server.start)  # the same ports
                    await wait_back(devices, deployment.id, stopped, timeout=45)
            await server.wait_connected((d.id for d in devices), 0, timeout=10)
            seen = await status_times(server)
        finally:
            await close_all(devices)

    r = RestartFigures.of(devices, deployment.id, stopped, ready, seen)
    print(f"\n{r}\nthis process's event loop stalled at most {lag.max * 1000:.0f} ms")
    # All cut together by the server (the grace ends for every stream at once) ...
    assert max(r.cuts) - min(r.cuts) < 0.5
    # ... and spread out again by the jitter: in lockstep these would all be 0.5 s.
    assert percentile(r.first_retries, 90) - percentile(r.first_retries, 10) > 0.2
    assert min(r.first_retries) >= AGENT_BACKOFF_INITIAL_S * 0.5 - 0.01
    # Exponential: the number of tries grows with the log of the outage (a hot loop would make hundreds).
    assert all(t <= b for t, b in zip(r.tries, r.tries_bound, strict=True)), r.tries
    # The new server sees the fleet arrive spread out, not in one burst (in lockstep all n would arrive in
    # the same few ms; the first retry's jitter alone spreads a wave over 0.5 s, about n/5 per 100 ms) ...
    assert percentile(r.arrivals, 90) - percentile(r.arrivals, 10) > 0.25
    assert busiest_window(r.arrivals, 0.1) <= 0.4 * n
    # ... and everyone is back within a bound.
    assert max(r.backs) < 30


# ---- slow and stuck download consumers --------------------------------------------------------------------


async def test_stuck_and_slow_download_consumers_do_not_exhaust_the_server(
    tmp_path: Path, keys: signing.KeyFiles, model: bytes
) -> None:
    """Slow or stuck download consumers do not exhaust the server.

    On an 8 MiB model, 40 devices (and one device with 2 calls, the most one device may hold, and a refused
    third) open DownloadModel
    and read one chunk, then nothing; 10 more read a chunk every 0.5 s. Flow control holds: the server keeps
    a bounded window per stuck call instead of reading the model into memory, its threads are not tied up,
    other devices' calls are answered promptly and their full downloads complete; the slow readers keep
    getting data; and when the stuck consumers go away every file they held is closed."""
    async with asyncio.timeout(90), running(tmp_path, keys) as server:
        path = await asyncio.to_thread(server.push_model, model, "big", "1")
        devices = await enroll(server, 40 + 1 + 10 + 10)
        stuck, hog, slow, others = devices[:40], devices[40], devices[41:51], devices[51:]
        for device in [*stuck, hog]:
            # Without BDP probing the client's window stays at 64 KiB: the consumer really takes nothing
            # (with it, grpc's client library would buffer megabytes for the application on its own).
            device.channel_options = [("grpc.http2.bdp_probe", 0)]
        stuck_calls: list[Any] = []
        try:
            assert set(await asyncio.gather(*(d.get_assignment() for d in devices))) == {OK}  # connections up
            idle = server.usage()
            async with UsageSampler(server) as sampler:
                for device in [*stuck, *[hog] * 2]:
                    call = device.stub.DownloadModel(device_pb2.DownloadModelRequest(target_path=path))
                    first = await call.read()
                    assert first.total_length == len(model)
                    stuck_calls.append(call)
                # The same device may not pile up more: the server refuses a third at once.
                extra = hog.stub.DownloadModel(device_pb2.DownloadModelRequest(target_path=path))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await extra.read()
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

                async def read_slowly(device: SimDevice, until: float) -> list[float]:
                    call = device.stub.DownloadModel(device_pb2.DownloadModelRequest(target_path=path))
                    waits = []
                    try:
                        while time.monotonic() < until:
                            asked = time.monotonic()
                            await call.read()
                            waits.append(time.monotonic() - asked)
                            await asyncio.sleep(0.5)
                    finally:
                        call.cancel()
                    return waits

                slow_readers = asyncio.gather(*(read_slowly(d, time.monotonic() + 6) for d in slow))
                await asyncio.sleep(1)
                unary_s = []
                for _ in range(10):
                    asked = time.monotonic()
                    codes = await asyncio.gather(
                        *(d.get_assignment() for d in others), *(d.report_telemetry() for d in others)
                    )
                    unary_s.append(time.monotonic() - asked)
                    assert set(codes) == {OK}, codes
                asked = time.monotonic()
                downloads = await asyncio.gather(*(d.download(path) for d in others[:5]))
                download_s = time.monotonic() - asked
                slow_waits = await slow_readers
                held = server.usage()
            stuck_n = len(stuck_calls)
            per_call = (sampler.peak.rss - idle.rss) / (stuck_n + len(slow))
            print(
                f"\nidle {idle}; with {stuck_n} stuck and {len(slow)} slow downloads: {held}, peak "
                f"{sampler.peak} ({per_call / MIB:.2f} MiB per call; the model is {len(model) / MIB:.0f} MiB)\n"
                f"other devices' unary calls: max {max(unary_s) * 1000:.0f} ms per round; 5 full downloads "
                f"{download_s:.2f} s; slow readers' longest wait for a chunk {max(map(max, slow_waits)):.3f} s"
            )
            assert all(data == model for data in downloads)
            assert max(unary_s) < 2, unary_s
            assert download_s < 20, download_s
            assert max(map(max, slow_waits)) < 2, slow_waits
            # Bounded by flow control: far less than the model per stuck call, not tied to its size.
            assert per_call < 3 * MIB, f"{per_call / MIB:.2f} MiB per stuck download"
            assert sampler.peak.threads - idle.threads <= 4, (idle, sampler.peak)
            assert held.fds >= idle.fds + stuck_n  # they really are held open: each keeps its file
            assert server.alive()
        finally:
            for call in stuck_calls:
                call.cancel()
            await asyncio.sleep(0.5)
            after = server.usage()
            await close_all(devices)
        print(f"after the stuck consumers left: {after}")
        assert after.fds <= idle.fds + 2, f"{after.fds - idle.fds} files still open after the downloads ended"


# ---- the agent's telemetry queue ----------------------------------------------------------------------------


async def test_agent_telemetry_queue_keeps_the_newest_reports_and_counts_what_it_drops() -> None:
    """The agent's bounded queue drops oldest first and counts the drops.

    A device that cannot send (server down, or rate-limited) keeps the newest `telemetry_queue_size`
    reports; each one pushed out is counted (the count goes out with the next report sent), and a report
    whose sending failed goes back to the front unless the queue filled up meanwhile (then it is the
    oldest, and the one dropped)."""
    outbox = Outbox(telemetry_size=5)
    for i in range(12):
        outbox.put_telemetry(device_pb2.TelemetryReport(at_unix_ms=i))
    assert [r.at_unix_ms for r in outbox.telemetry] == [7, 8, 9, 10, 11]
    assert outbox.dropped == 7

    failed = await outbox.get_telemetry()  # sending it fails: back to the front
    assert failed.at_unix_ms == 7
    outbox.put_telemetry(failed, front=True)
    assert [r.at_unix_ms for r in outbox.telemetry] == [7, 8, 9, 10, 11] and outbox.dropped == 7

    failed = await outbox.get_telemetry()
    outbox.put_telemetry(device_pb2.TelemetryReport(at_unix_ms=12))  # a new one arrives meanwhile
    outbox.put_telemetry(failed, front=True)  # full again: the failed (oldest) one is dropped
    assert [r.at_unix_ms for r in outbox.telemetry] == [8, 9, 10, 11, 12]
    assert outbox.dropped == 8
    assert len(outbox.telemetry) <= 5
