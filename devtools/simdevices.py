"""Simulated devices: many real enrolled devices in one process, without the agent.

Each `SimDevice` is enrolled for real (`enroll`: Enroll over the enrollment port with a CSR of its own key),
has an mTLS channel (TCP + TLS connection) of its own and a Connect control stream that reports its status
and stays open, reconnecting with the agent's own jittered exponential `Backoff` as edgefleet.agent does.
What each one received and when is recorded, for the caller to measure or assert.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from edgefleet import pki
from edgefleet.agent import decisions
from edgefleet.agent.connection import Backoff
from edgefleet.devtools.raw_rpc import simulated_capabilities
from edgefleet.devtools.serverprocess import ServerProcess
from edgefleet.devtools.simbehaviour import BehaviourOf, draw_stats
from edgefleet.server.storage.records import now_ms
from edgefleet.v1 import common_pb2, device_pb2, device_pb2_grpc, operator_pb2

OK = grpc.StatusCode.OK

CAPABILITIES = simulated_capabilities("load-sim")

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
    # Obeying (when `behave` is set): installs assignments and obeys rollbacks as an agent would, and
    # `start_telemetry` reports what `behave` draws for the model it serves.
    behave: BehaviourOf | None = None
    capabilities: common_pb2.Capabilities = field(default_factory=lambda: CAPABILITIES)
    current: common_pb2.ModelRef | None = None
    previous: common_pb2.ModelRef | None = None
    shadow_candidate: common_pb2.ModelRef | None = None
    rollbacks: list[device_pb2.RollbackCommand] = field(default_factory=list)
    received: list[device_pb2.Assignment] = field(default_factory=list)
    served: list[str] = field(default_factory=list)  # target paths it activated, in order
    step_s: float = 0.02  # between the stages of an install
    calls_per_report: int = 200

    def __post_init__(self) -> None:
        self.backoff = Backoff(AGENT_BACKOFF_INITIAL_S, AGENT_BACKOFF_MAX_S)
        self.channel: grpc.aio.Channel | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._call: Any = None
        self._outbox: asyncio.Queue[device_pb2.DeviceMessage] = asyncio.Queue()
        self._carried: list[device_pb2.DeviceMessage] = []  # taken from the outbox for a stream that ended
        self._last_event: device_pb2.DeviceMessage | None = None  # sent again on every new stream
        self._work: set[asyncio.Task[None]] = set()
        self._telemetry: asyncio.Task[None] | None = None
        self.rng = np.random.default_rng(int.from_bytes(hashlib.sha256(self.id.encode()).digest()[:8], "big"))
        self.bad_targets: list[str] = []
        self.retries: dict[str, list[str]] = {}  # target -> retry orders that lifted its bad mark
        self.installs_tried: dict[str, int] = {}  # target -> installs started

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
        if self._telemetry is not None:
            self._telemetry.cancel()
            self._telemetry = None
        for task in list(self._work):
            task.cancel()
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
        ended = asyncio.Event()  # as the agent does: gRPC reads the iterator of a call that is over

        async def outgoing() -> AsyncIterator[device_pb2.DeviceMessage]:
            yield device_pb2.DeviceMessage(status=self._status())
            if self._last_event is not None:  # again, as the agent does: it may have been lost in flight
                self.sequence += 1
                self._last_event.event.sequence = self.sequence
                self._last_event.event.repeated = True
                yield self._last_event
            while not stop.is_set() and not ended.is_set():
                waiting = asyncio.ensure_future(self._next_message())
                stopping = asyncio.ensure_future(stop.wait())
                ending = asyncio.ensure_future(ended.wait())
                done, _ = await asyncio.wait({waiting, stopping, ending}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                ending.cancel()
                if waiting not in done:
                    waiting.cancel()
                    return
                message = waiting.result()
                if ended.is_set():  # taken for a call that is over: the next stream sends it
                    self._carried.append(message)
                    return
                self.sequence += 1
                field_name = message.WhichOneof("kind")
                getattr(message, field_name or "status").sequence = self.sequence
                if field_name == "event":
                    self._last_event = message
                yield message

        self._call = self.stub.Connect(outgoing())
        try:
            async for message in self._call:
                self.backoff.reset()
                kind = message.WhichOneof("kind")
                if kind == "hello":
                    self.sequence = max(self.sequence, message.hello.last_sequence)
                elif kind == "assignment":
                    self.assignments.append((time.monotonic(), message.assignment.deployment_id))
                    if self.behave is not None:
                        self._spawn(self._install(message.assignment))
                elif kind == "rollback" and self.behave is not None:
                    self._spawn(self._roll_back(message.rollback))
        finally:
            ended.set()
            self._call = None  # a finished call still holds its channel's connection open

    async def _next_message(self) -> device_pb2.DeviceMessage:
        return self._carried.pop(0) if self._carried else await self._outbox.get()

    # -- obeying, as an agent would --

    def _status(self) -> device_pb2.DeviceStatus:
        self.sequence += 1
        return device_pb2.DeviceStatus(
            current=self.current,
            previous=self.previous,
            capabilities=self.capabilities,
            agent_version="load-sim",
            bad_targets=self.bad_targets,
            sent_at_unix_ms=now_ms(),
            sequence=self.sequence,
        )

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    def _event(
        self,
        target: str,
        stage: common_pb2.UpdateStage.ValueType,
        deployment_id: str = "",
        command_id: str = "",
        reason: str = "",
        sha256: str = "",
    ) -> None:
        self._outbox.put_nowait(
            device_pb2.DeviceMessage(
                event=device_pb2.UpdateEvent(
                    target_path=target,
                    stage=stage,
                    reason=reason,
                    at_unix_ms=now_ms(),
                    command_id=command_id,
                    deployment_id=deployment_id,
                    target_sha256=sha256,
                )
            )
        )

    async def _install(self, a: device_pb2.Assignment) -> None:
        assert self.behave is not None
        self.received.append(a)
        target = a.model.target_path
        if self.current is not None and target == self.current.target_path and not a.shadow:
            self.shadow_candidate = None  # a shadow wave's candidate served already: nothing to install
            return
        if target in self.bad_targets:
            lifted = self.retries.setdefault(target, [])
            retry = decisions.retry_lift(
                target, a.deployment_id, retry=a.retry, bad_targets=self.bad_targets, lifted_for=lifted
            )  # as the agent decides: once per retry order, a bounded number of times per target
            if not retry.lift:
                return
            self.bad_targets.remove(target)
            lifted.append(a.deployment_id)
        tries = self.installs_tried[target] = self.installs_tried.get(target, 0) + 1
        behaviour = self.behave(target)
        stages = common_pb2.UpdateStage
        self._event(target, stages.UPDATE_STAGE_DOWNLOADING, a.deployment_id, sha256=a.model.sha256)
        await asyncio.sleep(self.step_s)
        fails = self.rng.random() < behaviour.install_failure_rate
        if fails and (tries == 1 or not behaviour.transient_install_failure):
            self.bad_targets.append(target)
            self._event(
                target,
                stages.UPDATE_STAGE_FAILED,
                a.deployment_id,
                reason="simulated failure",
                sha256=a.model.sha256,
            )
            self._outbox.put_nowait(device_pb2.DeviceMessage(status=self._status()))
            return
        self._event(target, stages.UPDATE_STAGE_VERIFIED, a.deployment_id, sha256=a.model.sha256)
        await asyncio.sleep(self.step_s)
        if a.shadow:
            self.shadow_candidate = a.model
            self._event(target, stages.UPDATE_STAGE_SHADOW_READY, a.deployment_id, sha256=a.model.sha256)
            return
        self.previous, self.current, self.shadow_candidate = self.current, a.model, None
        self.served.append(target)
        self._outbox.put_nowait(device_pb2.DeviceMessage(status=self._status()))
        self._event(target, stages.UPDATE_STAGE_ACTIVATED, a.deployment_id, sha256=a.model.sha256)
        await asyncio.sleep(self.step_s)  # probation
        self._event(target, stages.UPDATE_STAGE_HEALTHY, a.deployment_id, sha256=a.model.sha256)

    async def _roll_back(self, command: device_pb2.RollbackCommand) -> None:
        obeyed = any(c.command_id == command.command_id for c in self.rollbacks)
        self.rollbacks.append(command)
        if obeyed:  # as the agent does: say what it runs again, never go back twice for one order
            self._outbox.put_nowait(device_pb2.DeviceMessage(status=self._status()))
            return
        if self.previous is None:
            return
        self.current, self.previous = self.previous, self.current
        self.shadow_candidate = None
        self._outbox.put_nowait(device_pb2.DeviceMessage(status=self._status()))
        self._event(
            self.current.target_path,
            common_pb2.UpdateStage.UPDATE_STAGE_ROLLED_BACK,
            command_id=command.command_id,
            sha256=self.current.sha256,
        )

    def start_telemetry(self, interval_s: float) -> None:
        """Reports what `behave` draws for the serving model (and a shadow candidate) every interval."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval_s)
                await self.report_inference()

        self._telemetry = asyncio.create_task(loop())

    async def report_inference(self, timeout: float = 10) -> grpc.StatusCode:
        if self.behave is None or self.current is None:
            return OK
        serving = self.current.target_path
        shadow = None
        if self.shadow_candidate is not None:
            shadow = (self.shadow_candidate.target_path, self.behave(self.shadow_candidate.target_path))
        stats = draw_stats(self.rng, serving, self.behave(serving), self.calls_per_report, shadow)
        request = device_pb2.ReportTelemetryRequest(
            report=device_pb2.TelemetryReport(at_unix_ms=now_ms(), inference=[stats])
        )
        try:
            await self.stub.ReportTelemetry(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            return e.code()
        return OK

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
    server: ServerProcess,
    count: int,
    *,
    prefix: str = "sim",
    concurrency: int = 16,
    group: str = "load",
    timezones: Sequence[str] = (),
) -> list[SimDevice]:
    """Enrolls `count` devices for real: one token with `count` uses, then Enroll with a fresh key's CSR
    per device over the enrollment port (server-authenticated TLS), `concurrency` at a time. Device `i`
    reports `timezones[i % len(timezones)]` as its Capabilities.timezone (as an agent's --timezone does)."""
    token = (
        await server.operator.CreateEnrollmentToken(
            operator_pb2.CreateEnrollmentTokenRequest(group=group, uses=count),
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
        capabilities = CAPABILITIES
        if timezones:  # its own time zone, for device-local maintenance windows
            capabilities = common_pb2.Capabilities()
            capabilities.CopyFrom(CAPABILITIES)
            capabilities.timezone = timezones[i % len(timezones)]
        request = device_pb2.EnrollRequest(
            enrollment_token=token,
            device_name=name,
            capabilities=capabilities,
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
            reply.device_id,
            name,
            pki.key_pem(key),
            reply.certificate_pem,
            ca_pem,
            server.address,
            capabilities=capabilities,
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
