"""The device agent: one asyncio program that keeps the device's model current, safe and observable.

    enroll (first start) -> serve the current model -> control stream to the server (reconnects with
    jittered exponential backoff; sends the device's status first, every time)
    assignment  -> refresh signed metadata (python-tuf) -> download with resume -> check length + sha256
                -> candidate in its own process: tensor signature + golden output -> swap -> probation
                -> healthy, or back to the previous model and the version marked bad
    rollback    -> the previous model from the local copy, no download
    every N s   -> telemetry (health + inference histograms); a periodic check in case the stream is down

Blocking work (metadata verification, hashing, decompression, process start) runs in threads; inference
runs in model worker processes (edgefleet.agent.serving`). Every stage is reported to the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import platform
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.faults import Faults
from edgefleet.agent.serving import LATENCY_BOUNDS_MS, ModelWorker, Result, Serving
from edgefleet.agent.state import AgentState, StateStore

from edgefleet import __version__, errors, pki, wire
from edgefleet.durable import commit_file, fsync_dir, write_atomic
from edgefleet.modelinfo import check_signature
from edgefleet.runtime import default_runtime, runtime_version
from edgefleet.signing import DeviceTrust, ModelTarget, verify_file
from edgefleet.tensors import ref_from_dict, ref_to_dict
from edgefleet.v1 import common_pb2, device_pb2, device_pb2_grpc

log = logging.getLogger("edgefleet.agent")

Stage = common_pb2.UpdateStage
# Status codes worth retrying; anything else from the server is a refusal.
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
}


MAX_STARTS_IN_PROBATION = 3
MAX_WORKER_CRASHES = 3  # within WORKER_CRASH_WINDOW_S: the model is bad, go back to the previous one
WORKER_CRASH_WINDOW_S = 600.0


def now_ms() -> int:
    return int(time.time() * 1000)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Backoff:
    """Jittered exponential backoff, so a fleet that lost its server does not reconnect in one stampede."""

    def __init__(self, initial: float, maximum: float):
        self.initial, self.maximum, self.current = initial, maximum, initial

    def next(self) -> float:
        delay = self.current * random.uniform(0.5, 1.5)
        self.current = min(self.current * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.current = self.initial


class Outbox:
    """What waits to be sent. Events and status (control stream) are kept, bounded; telemetry (its own RPC)
    keeps the newest `telemetry_size` reports, dropping the oldest first and counting what it drops."""

    def __init__(self, telemetry_size: int, events_size: int = 1000):
        self.events: deque[device_pb2.DeviceMessage] = deque(maxlen=events_size)
        self.telemetry: deque[device_pb2.TelemetryReport] = deque(maxlen=telemetry_size)
        self.dropped = 0
        self._events_ready = asyncio.Event()
        self._telemetry_ready = asyncio.Event()

    def put_event(self, message: device_pb2.DeviceMessage) -> None:
        self.events.append(message)
        self._events_ready.set()

    def put_telemetry(self, report: device_pb2.TelemetryReport, *, front: bool = False) -> None:
        """`front` puts back a report whose sending failed; when the queue is full it is the one dropped."""
        if len(self.telemetry) == self.telemetry.maxlen:
            self.dropped += 1
            if front:
                return
        if front:
            self.telemetry.appendleft(report)
        else:
            self.telemetry.append(report)
        self._telemetry_ready.set()

    async def get_event(self) -> device_pb2.DeviceMessage:
        while not self.events:
            self._events_ready.clear()
            await self._events_ready.wait()
        return self.events.popleft()

    async def get_telemetry(self) -> device_pb2.TelemetryReport:
        while not self.telemetry:
            self._telemetry_ready.clear()
            await self._telemetry_ready.wait()
        return self.telemetry.popleft()


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.runtime = config.runtime or default_runtime()
        self.store = StateStore(config.state_dir)
        self.state: AgentState = self.store.load()
        self.serving = Serving(call_timeout=config.inference_timeout_s)
        self.outbox = Outbox(config.telemetry_queue_size)
        self.connected = False
        self.device_id = ""
        self._token = ""
        self._channel: grpc.aio.Channel | None = None
        self._stub: device_pb2_grpc.DeviceServiceStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._update_lock = asyncio.Lock()
        self._wanted = ""  # the newest assignment; an older retry loop gives way to it
        self._applying: set[str] = set()  # targets with an update loop running
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._scheduler: AsyncIOScheduler | None = None
        self._local: Any = None
        self.trust = DeviceTrust(self.store.folder / "metadata", self._get_metadata_blocking)
        self.faults = Faults.from_env()
        self._worker_crashes: dict[str, list[float]] = {}  # target -> monotonic times its worker died
        self._refused: dict[str, str] = {}  # target -> why, for refusals that a new signature may lift

    # ---- lifecycle -------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Runs until `stop()`. Raises EdgefleetError when the agent cannot start (what to fix is in it)."""
        self._loop = asyncio.get_running_loop()
        try:
            await self._ensure_enrolled()
            await self._start_current_model()
            if self.config.socket_path or self.config.local_port:
                from edgefleet.agent.local_api import start_local_service

                self._local = await start_local_service(self, self.config.socket_path, self.config.local_port)
            self._scheduler = AsyncIOScheduler()
            self._scheduler.add_job(self._periodic_check, "interval", seconds=self.config.check_interval_s)
            self._scheduler.add_job(self._supervise_worker, "interval", seconds=1.0, max_instances=1)
            self._scheduler.add_job(
                self._collect_telemetry, "interval", seconds=self.config.telemetry_interval_s
            )
            self._scheduler.start()
            self._spawn(self._send_telemetry())
            await self._connection_loop()
        finally:
            await self._shutdown()

    def stop(self) -> None:
        self._stopping.set()

    async def _shutdown(self) -> None:
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        for task in list(self._tasks):
            task.cancel()
        if self._local is not None:
            await self._local.stop(1)
        await asyncio.to_thread(self.serving.stop)
        if self._channel is not None:
            await self._channel.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed: %r", task.exception(), exc_info=task.exception())

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        # With TLS the client certificate is the credential; a token exists only in plaintext demo mode.
        return (("authorization", f"Bearer {self._token}"),) if self._token else ()

    # ---- enrollment ------------------------------------------------------------------------------------

    def _open_channel(self, address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
        options = [
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.max_receive_message_length", 8 * 2**20),
        ]
        if credentials is None:
            return grpc.aio.insecure_channel(address, options=options)
        return grpc.aio.secure_channel(address, credentials, options=options)

    async def _ensure_enrolled(self) -> None:
        """First start: pin the fleet's root.json (and CA), trade the enrollment token for credentials.
        Then open the one channel every later call uses: mutual TLS, or plaintext only when configured so."""
        if not self.trust.is_pinned():
            if self.config.trust_root is None:
                raise errors.InvalidRequestError("first start needs --trust-root (the fleet's root.json)")
            DeviceTrust.pin_root(self.store.folder / "metadata", Path(self.config.trust_root).read_bytes())
        tls = pki.TlsFiles(self.store.folder / "tls")
        creds = self.store.load_credentials()
        if creds is None:
            creds = await self._enroll(tls)
        self.device_id, self._token = creds["device_id"], creds.get("device_token", "")
        if self.config.insecure_plaintext:
            self._channel = self._open_channel(self.config.server, None)
        else:
            if not tls.exists():
                raise errors.InvalidRequestError(f"{tls.folder} lacks the device's certificate: enroll again")
            self._channel = self._open_channel(
                self.config.server,
                grpc.ssl_channel_credentials(
                    root_certificates=tls.ca.read_bytes(),
                    private_key=tls.key.read_bytes(),
                    certificate_chain=tls.cert.read_bytes(),
                ),
            )
        self._stub = device_pb2_grpc.DeviceServiceStub(self._channel)

    async def _enroll(self, tls: pki.TlsFiles) -> dict[str, str]:
        if not self.config.enroll_token:
            raise errors.InvalidRequestError(
                "first start needs --enroll-token (from `edgefleet token create`)"
            )
        key = pki.new_key()
        request = device_pb2.EnrollRequest(
            enrollment_token=self.config.enroll_token,
            device_name=self.config.name,
            capabilities=self.capabilities(),
        )
        if self.config.insecure_plaintext:
            channel = self._open_channel(self.config.server, None)
        else:
            if self.config.ca_cert is None:
                raise errors.InvalidRequestError(
                    "first start needs --ca-cert (the fleet CA, from the server's ca/)"
                )
            ca_pem = Path(self.config.ca_cert).read_bytes()
            request.csr_pem = pki.make_csr(key, self.config.name)
            channel = self._open_channel(self.config.enroll_address, grpc.ssl_channel_credentials(ca_pem))
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        try:
            stub = device_pb2_grpc.DeviceServiceStub(channel)
            while True:
                try:
                    reply = await stub.Enroll(request, timeout=self.config.rpc_timeout_s)
                    break
                except grpc.aio.AioRpcError as e:
                    if e.code() not in _RETRYABLE:
                        raise errors.AccessDeniedError(f"enrollment refused: {e.details()}") from e
                    log.warning("enrollment: server unavailable (%s); retrying", e.code().name)
                    await asyncio.sleep(backoff.next())
        finally:
            await channel.close()
        if not self.config.insecure_plaintext:
            # Trust stays with the CA we were provisioned with; the reply's copy is not believed.
            tls.write(key, pki.x509.load_pem_x509_certificate(reply.certificate_pem), pki.load_cert(ca_pem))
        creds = {"device_id": reply.device_id, "group": reply.group}
        if reply.device_token:
            creds["device_token"] = reply.device_token
        self.store.save_credentials(creds)
        log.info("enrolled as %s in group %s", reply.device_id, reply.group)
        return creds

    # ---- serving the current model at start -------------------------------------------------------------

    async def _start_current_model(self) -> None:
        """Starts the model the state says runs; a file that fails its hash never runs and is re-fetched.

        The state file is the commit point of every update, so after a kill at any instant this runs either
        the old model or the new one, whole, and the first status report says which."""
        for leftover in (self.store.folder / "models").glob("*.tmp"):  # a decode cut short by a kill
            leftover.unlink(missing_ok=True)
        pending = self.state.pending
        if pending and self.state.previous:
            pending["starts"] = int(pending.get("starts", 0)) + 1
            self.store.save(self.state)
            if pending["starts"] > MAX_STARTS_IN_PROBATION:
                # The new model keeps taking the agent down before it can be called healthy: go back.
                bad = pending["target_path"]
                self.state.current, self.state.previous, self.state.pending = self.state.previous, None, None
                self.store.save(self.state)
                self._mark_bad(
                    bad, f"the agent restarted {MAX_STARTS_IN_PROBATION} times during its probation"
                )
                self._queue_event(
                    self.state.current["target_path"],
                    Stage.UPDATE_STAGE_ROLLED_BACK,
                    f"automatic rollback: {bad} never completed its probation",
                )
        current, previous = self.state.current, self.state.previous
        if previous is not None and not await asyncio.to_thread(self._usable, previous):
            self.state.previous = previous = None
            self.store.save(self.state)
        if current is None:
            return
        try:
            target = await asyncio.to_thread(self._load_local_target, current)
            worker = await asyncio.to_thread(
                self._test_candidate, target, self.store.model_path(target.sha256)
            )
        except (errors.EdgefleetError, ValueError, OSError) as e:
            log.error("current model %s is unusable: %s", current.get("target_path"), e)
            self.store.model_path(current.get("sha256", "x")).unlink(missing_ok=True)
            self._queue_event(
                current.get("target_path", ""), Stage.UPDATE_STAGE_FAILED, f"local copy unusable: {e}"
            )
            # Serve the previous model meanwhile (the truth goes in the status), and fetch the lost one again:
            # the bytes come back verified.
            self.state.current, self.state.previous, self.state.pending = previous, None, None
            self.store.save(self.state)
            if previous is not None:
                await self._serve_local(previous)
            self._spawn(self._apply_assignment(current))
            return
        self.serving.swap(worker, target.ref())
        if not self.state.pending:
            # Re-confirm after a restart: a "healthy" report in flight at a kill is not lost.
            self._queue_event(target.path, Stage.UPDATE_STAGE_HEALTHY, "checked again at start")
        else:
            self._spawn(self._resume_probation(current["target_path"]))

    def _usable(self, ref: dict[str, Any]) -> bool:
        try:
            self._load_local_target(ref)
            return True
        except (errors.EdgefleetError, ValueError, OSError):
            self.store.model_path(ref.get("sha256", "x")).unlink(missing_ok=True)
            return False

    async def _serve_local(self, ref: dict[str, Any]) -> None:
        try:
            target = await asyncio.to_thread(self._load_local_target, ref)
            worker = await asyncio.to_thread(
                self._test_candidate, target, self.store.model_path(target.sha256)
            )
        except (errors.EdgefleetError, ValueError, OSError) as e:
            log.error("model %s is unusable too: %s", ref.get("target_path"), e)
            self.state.current = None
            self.store.save(self.state)
            return
        self.serving.swap(worker, target.ref())

    async def _resume_probation(self, path: str) -> None:
        """Killed during a probation: finish it, under the update lock like any update."""
        async with self._update_lock:
            if self.state.pending and self.state.pending.get("target_path") == path and self.state.current:
                await self._probation(self.state.current, self.state.previous)

    def _load_local_target(self, ref: dict[str, Any]) -> ModelTarget:
        path = self.store.model_path(ref["sha256"])
        meta = path.with_suffix(".target.json")
        if not path.exists() or not meta.exists():
            raise errors.HashMismatchError("model file is missing")
        target = ModelTarget.from_target_json(meta.read_bytes())
        verify_file(target.target, path)
        return target

    # ---- control stream --------------------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        while not self._stopping.is_set():
            stream = self._spawn(self._run_stream(backoff))
            stopper = self._spawn(self._stopping.wait())
            await asyncio.wait({stream, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if self._stopping.is_set():
                stream.cancel()
                break
            self.connected = False
            exc = stream.exception() if not stream.cancelled() else None
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in _RETRYABLE:
                log.error("server refused the control stream: %s %s", exc.code().name, exc.details())
            elif exc is not None and not isinstance(exc, grpc.aio.AioRpcError):
                log.error("control stream failed: %r", exc)
            delay = backoff.next()
            log.info("control stream down; reconnecting in %.1f s", delay)
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
            except TimeoutError:
                pass

    async def _run_stream(self, backoff: Backoff) -> None:
        assert self._stub is not None

        async def outgoing() -> AsyncIterator[device_pb2.DeviceMessage]:
            yield self._status_message()  # the truth first, on every connect
            while True:
                yield await self.outbox.get_event()

        call = self._stub.Connect(outgoing(), metadata=self._metadata)
        async for message in call:
            self.connected = True
            backoff.reset()
            kind = message.WhichOneof("kind")
            if kind == "assignment":
                ref = ref_to_dict(message.assignment.model)
                self._spawn(self._apply_assignment(ref))
            elif kind == "rollback":
                self._spawn(self.rollback(message.rollback.command_id, message.rollback.reason))
            await asyncio.sleep(0)
        # A stream the server ended cleanly still counts as down: reconnect.

    def _status_message(self) -> device_pb2.DeviceMessage:
        # The sequence is persisted before use, so no restart or clock change ever sends an old number.
        self.state.status_sequence += 1
        self.store.save(self.state)
        return device_pb2.DeviceMessage(
            status=device_pb2.DeviceStatus(
                current=ref_from_dict(self.state.current),
                previous=ref_from_dict(self.state.previous),
                capabilities=self.capabilities(),
                agent_version=__version__,
                bad_targets=self.state.bad_targets,
                sent_at_unix_ms=now_ms(),
                sequence=self.state.status_sequence,
            )
        )

    def _queue_status(self) -> None:
        self.outbox.put_event(self._status_message())

    def _queue_event(self, target_path: str, stage: int, reason: str = "", command_id: str = "") -> None:
        log.info("%s %s %s", Stage.Name(stage).removeprefix("UPDATE_STAGE_").lower(), target_path, reason)
        self.outbox.put_event(
            device_pb2.DeviceMessage(
                event=device_pb2.UpdateEvent(
                    target_path=target_path,
                    stage=stage,  # type: ignore[arg-type]
                    reason=reason[:1000],
                    at_unix_ms=now_ms(),
                    command_id=command_id,
                )
            )
        )

    async def _periodic_check(self) -> None:
        """The fallback when the control stream missed something (or is down)."""
        assert self._stub is not None
        try:
            reply = await self._stub.GetAssignment(
                device_pb2.GetAssignmentRequest(), metadata=self._metadata, timeout=self.config.rpc_timeout_s
            )
        except grpc.aio.AioRpcError as e:
            log.debug("periodic check failed: %s", e.code().name)
            return
        if reply.rollback_pending:
            self._spawn(self.rollback(reply.rollback_command_id, "ordered by an operator (periodic check)"))
        elif reply.HasField("assignment"):
            self._spawn(self._apply_assignment(ref_to_dict(reply.assignment.model)))

    # ---- metadata over gRPC, for python-tuf running in a worker thread ---------------------------------

    def _get_metadata_blocking(self, name: str) -> bytes:
        assert self._loop is not None and self._stub is not None
        stub = self._stub

        async def fetch() -> bytes:
            reply = await stub.GetMetadata(
                device_pb2.GetMetadataRequest(name=name),
                metadata=self._metadata,
                timeout=self.config.rpc_timeout_s,
            )
            return bytes(reply.content)

        try:
            return asyncio.run_coroutine_threadsafe(fetch(), self._loop).result(self.config.rpc_timeout_s + 5)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise FileNotFoundError(name) from e
            raise errors.TransportError(f"GetMetadata {name}: {e.code().name} {e.details()}") from e
        except TimeoutError as e:
            raise errors.TransportError(f"GetMetadata {name} timed out") from e

    # ---- updates ---------------------------------------------------------------------------------------

    async def _apply_assignment(self, ref: dict[str, Any] | None) -> None:
        """Installs the assigned model. Transport failures, expired metadata and a full disk are retried
        with backoff until it works or a newer assignment replaces it; a bad artifact marks the version bad
        (never retried); a downgrade without an operator's signature is refused until the metadata changes."""
        if not ref or ref["target_path"] in self._applying:
            return  # a loop for this target is already at work
        path = ref["target_path"]
        self._wanted = path
        self._applying.add(path)
        try:
            await self._apply_loop(path)
        finally:
            self._applying.discard(path)

    async def _apply_loop(self, path: str) -> None:
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        reported = ""
        while self._wanted == path and not self._stopping.is_set():
            async with self._update_lock:
                if self._wanted != path:
                    return  # a newer assignment or a rollback came while this one waited for the lock
                current = (self.state.current or {}).get("target_path")
                if current == path or path in self.state.bad_targets:
                    return
                try:
                    await self._install(path)
                    return
                except errors.EdgefleetError as e:
                    if e.marks_bad:  # a property of the signed artifact: never tried again
                        self._mark_bad(path, str(e))
                        await asyncio.to_thread(self.store.prune_models, self._kept_models())
                        return
                    if not e.retryable:  # a downgrade without the operator's permission: until it changes
                        if self._refused.get(path) != str(e):
                            self._refused[path] = str(e)
                            self._queue_event(path, Stage.UPDATE_STAGE_FAILED, str(e))
                        return
                    problem = str(e)
                    log.warning("update to %s interrupted: %s", path, problem)
                    if isinstance(e, errors.MetadataError) and reported != problem:
                        reported = problem  # report once per kind of trouble, then retry quietly
                        self._queue_event(path, Stage.UPDATE_STAGE_FAILED, f"will retry: {problem}")
                except OSError as e:
                    problem = f"storage: {e}"
                    log.warning("update to %s interrupted: %s", path, problem)
                    # Disk full or failing: drop the partial download; the old model is untouched.
                    await asyncio.to_thread(self.store.prune_models, self._kept_models())
                    if reported != problem:
                        reported = problem
                        self._queue_event(path, Stage.UPDATE_STAGE_FAILED, f"will retry: {problem}")
            await asyncio.sleep(backoff.next())

    def _kept_models(self) -> set[str]:
        return {r["sha256"] for r in (self.state.current, self.state.previous) if r}

    def _mark_bad(self, path: str, reason: str) -> None:
        if path not in self.state.bad_targets:
            self.state.bad_targets.append(path)
            self.state.bad_targets[:] = self.state.bad_targets[-256:]
        self.store.save(self.state)
        self._queue_event(path, Stage.UPDATE_STAGE_FAILED, reason)
        self._queue_status()

    def _check_compatible(self, target: ModelTarget) -> None:
        if target.runtimes and self.runtime not in target.runtimes:
            raise errors.IncompatibleError(
                f"{target.path} is signed as correct on {', '.join(target.runtimes)}, this device runs {self.runtime}"
            )
        if target.hardware_classes and self.config.hardware_class not in target.hardware_classes:
            raise errors.IncompatibleError(
                f"{target.path} is built for {', '.join(target.hardware_classes)}, "
                f"this device is {self.config.hardware_class or 'unclassified'}"
            )

    def _check_not_downgrade(self, target: ModelTarget) -> None:
        """Older than what this device has run needs the operator's signed permission (not the server's)."""
        floor = self.state.floors.get(target.name, 0)
        if target.sequence >= floor:
            return
        allowed = self.trust.rollback_floors.get(target.name)
        if allowed is None or target.sequence < allowed:
            raise errors.DowngradeRefusedError(
                f"{target.path} is older than what this device has run ({target.name} sequence {target.sequence} < "
                f"{floor}) and no operator signature allows going back to it"
            )

    async def _install(self, path: str) -> None:
        target: ModelTarget = ModelTarget.from_target(await asyncio.to_thread(self.trust.target, path))
        self._check_compatible(target)
        self._check_not_downgrade(target)
        model_file = self.store.model_path(target.sha256)
        # Its process starts now and imports the runtime while we download and verify. It loads at a lower
        # CPU priority while another model serves; with none serving, nothing is there to yield to.
        worker = self._new_worker(target.length, low_priority=self.serving.worker is not None).spawn()
        try:
            have = model_file.exists() and await asyncio.to_thread(_verifies, target, model_file)
            if have:  # the signed description may be newer than the one kept (or lost to a kill)
                write_atomic(model_file.with_suffix(".target.json"), target.target_json())
            else:
                self._queue_event(path, Stage.UPDATE_STAGE_DOWNLOADING)
                resumed = await self._download(target)
                await self.faults.at_async("downloaded")
                self._queue_event(path, Stage.UPDATE_STAGE_DOWNLOADED)
                await asyncio.to_thread(self._finish_file, target, resumed)
            self._queue_event(
                path, Stage.UPDATE_STAGE_VERIFIED, "signed metadata, length and sha256 check out"
            )
            await asyncio.to_thread(self._test_candidate, target, model_file, worker)
        except BaseException:
            worker.kill()
            raise
        await self._activate(target, worker)

    async def _download(self, target: ModelTarget) -> bool:
        """Appends to downloads/<sha>.part from its current length; never keeps more than the signed length.
        Returns whether it resumed an earlier partial download."""
        assert self._stub is not None
        part = self.store.download_path(target.sha256)
        offset = part.stat().st_size if part.exists() else 0
        if offset > target.wire_length:
            part.unlink()
            offset = 0
        log.info("downloading %s from byte %d of %d", target.path, offset, target.wire_length)
        started_at = offset
        with open(part, "ab") as f:
            call = self._stub.DownloadModel(
                device_pb2.DownloadModelRequest(target_path=target.path, offset=offset),
                metadata=self._metadata,
            )
            stream = call.__aiter__()
            try:
                while offset < target.wire_length:
                    try:
                        chunk = await asyncio.wait_for(stream.__anext__(), self.config.stall_timeout_s)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        raise errors.TransportError(
                            f"download stalled: nothing for {self.config.stall_timeout_s:.0f} s"
                        ) from None
                    if chunk.offset != offset:
                        raise errors.TransportError(
                            f"server sent bytes for offset {chunk.offset}, expected {offset}"
                        )
                    data = chunk.data[: target.wire_length - offset]  # cut off at the signed length
                    f.write(data)
                    offset += len(data)
            except grpc.aio.AioRpcError as e:
                # Even NOT_FOUND may be the server's passing fault (a restore): the signed target is not bad.
                raise errors.TransportError(f"download: {e.code().name} {e.details()}") from e
            finally:
                call.cancel()
                f.flush()
                os.fsync(f.fileno())
        if offset < target.wire_length:
            raise errors.TransportError(f"download ended at {offset} of {target.wire_length} bytes")
        return started_at > 0

    def _finish_file(self, target: ModelTarget, resumed: bool = False) -> None:
        """Blocking: checks the wire bytes, decodes them (bounded by the signed length), checks the model's
        length and sha256, and moves it into place durably. Deletes the partial file when anything is bad."""
        part = self.store.download_path(target.sha256)
        final = self.store.model_path(target.sha256)
        tmp = final.with_suffix(".tmp")
        try:
            if sha256_file(part) != target.wire_sha256:
                raise errors.HashMismatchError(
                    f"{target.path}: downloaded bytes do not match the signed sha256"
                )
            decoder = wire.BoundedDecoder(target.wire_encoding, target.length)
            with open(part, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(decoder.feed(chunk))
                dst.write(decoder.finish())
            verify_file(target.target, tmp)
            self.faults.at("verified")
        except BaseException:
            part.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
            raise
        write_atomic(final.with_suffix(".target.json"), target.target_json())
        commit_file(tmp, final)
        part.unlink(missing_ok=True)
        fsync_dir(part.parent)
        self.faults.at("written")

    def _new_worker(self, model_length: int, low_priority: bool = False) -> ModelWorker:
        """Start, restart and rollback load at normal priority: nothing serves then, or the operator wants
        the old model back now. Only an update's candidate loads at a lower one (`ModelWorker`)."""
        # The candidate's own address-space limit: generous for the runtime (~150 MiB) and the model, far
        # below what a model built to exhaust memory would take.
        limit = self.config.worker_memory_limit_bytes or 1024 * 2**20 + 4 * model_length
        return ModelWorker(
            None,
            self.runtime,
            num_threads=self.config.num_threads,
            memory_limit_bytes=limit,
            low_priority=low_priority,
        )

    def _test_candidate(
        self, target: ModelTarget, model_file: Path, worker: ModelWorker | None = None
    ) -> ModelWorker:
        """Blocking: loads the model in its own process (time and memory limited), checks its tensors against
        the signed signature and its output on the signed golden input. The warm worker is returned."""
        worker = worker or self._new_worker(target.length)
        try:
            signature = worker.load(
                model_file, timeout=self.config.candidate_timeout_s, warm_inputs=target.golden.inputs
            )
            check_signature(signature, target.signature)
            if worker.warm_error is not None:
                raise errors.ModelError(f"the candidate fails on its golden input: {worker.warm_error}")
            assert worker.warm_outputs is not None
            target.golden.check(worker.warm_outputs)
        except BaseException:
            worker.kill()
            raise
        return worker

    async def _activate(self, target: ModelTarget, worker: ModelWorker) -> None:
        previous = self.state.current
        if previous is not None and previous.get("target_path") == target.path:
            previous = (
                self.state.previous
            )  # re-installing the same model (a lost copy): keep the real previous
        floors = {
            **self.state.floors,
            target.name: max(self.state.floors.get(target.name, 0), target.sequence),
        }
        new_state = dataclasses.replace(
            self.state,
            current=target.ref(),
            previous=previous,
            pending={"target_path": target.path, "activated_ms": now_ms()},
            floors=floors,
        )
        try:
            self.store.save(new_state)  # the commit point: from here a restart runs the new model
        except BaseException:
            worker.kill()  # nothing changed: the old model keeps serving
            raise
        old = self.serving.swap(worker, target.ref())
        self.state = new_state
        await self.faults.at_async("activated")
        self._queue_event(target.path, Stage.UPDATE_STAGE_ACTIVATED)
        self._queue_status()
        if old is not None:
            self._spawn(asyncio.to_thread(old.retire))
        await self._probation(target.ref(), previous)

    async def _probation(self, ref: dict[str, Any], previous: dict[str, Any] | None) -> None:
        """Healthy after `probation_s` with no failed inference and the golden output still right;
        otherwise back to the previous model and this version is bad."""
        path = ref["target_path"]
        before = self.serving.totals(path)
        worker = self.serving.worker
        deadline = time.monotonic() + self.config.probation_s
        problem = ""
        while time.monotonic() < deadline and not problem:
            # Checked often: a model that fails goes back within a fraction of a second, not at the end.
            await asyncio.sleep(min(0.2, self.config.probation_s))
            if (self.state.current or {}).get("target_path") != path:
                return  # replaced meanwhile (a rollback)
            count, failed = (a - b for a, b in zip(self.serving.totals(path), before, strict=True))
            if failed:
                problem = f"{failed} of {count} inferences failed during probation"
            elif worker is not None and not worker.alive():
                problem = "its worker process died during probation"
        count, _ = (a - b for a, b in zip(self.serving.totals(path), before, strict=True))
        if not problem:
            try:
                target = await asyncio.to_thread(self._load_local_target, ref)
                result = await asyncio.to_thread(self.serving.infer, list(target.golden.inputs))
                target.golden.check(result.outputs)
            except errors.EdgefleetError as e:
                problem = f"golden check after activation failed: {e}"
        if not problem:
            self.state.pending = None
            self.store.save(self.state)
            await self.faults.at_async("committed")
            await asyncio.to_thread(self.store.prune_models, self._kept_models())
            self._queue_event(path, Stage.UPDATE_STAGE_HEALTHY, f"{count} inferences, 0 failed")
            return
        self._mark_bad(path, problem)
        if previous is not None:
            await self._switch_to_previous("", f"automatic rollback: {problem}", ordered=False)
        if self.state.pending and self.state.pending.get("target_path") == path:
            self.state.pending = None  # no way back: it keeps serving, marked bad, not re-tried at each start
            self.store.save(self.state)

    async def rollback(self, command_id: str, reason: str) -> None:
        """An operator's order: back to the previous model from its local copy (no download) and report it.
        Obeyed only when signed metadata allows the previous version (see `_check_not_downgrade`)."""
        async with self._update_lock:
            if command_id and command_id in self.state.rollbacks_done:
                self._queue_status()  # already obeyed: say so again, do not go back twice
                return
            await self._switch_to_previous(command_id, reason, ordered=True)

    async def _switch_to_previous(self, command_id: str, reason: str, *, ordered: bool) -> None:
        previous, current = self.state.previous, self.state.current
        if previous is None:
            self._queue_event(
                (current or {}).get("target_path", ""),
                Stage.UPDATE_STAGE_FAILED,
                "rollback impossible: no previous model on this device",
                command_id,
            )
            return
        try:
            target = await asyncio.to_thread(self._load_local_target, previous)
            if ordered:
                # The order came through the server; the permission must come from the operator's key.
                await asyncio.to_thread(self.trust.target, target.path)
                self._check_not_downgrade(target)
            worker = await asyncio.to_thread(
                self._test_candidate, target, self.store.model_path(target.sha256)
            )
        except errors.EdgefleetError as e:
            self._queue_event(
                previous["target_path"], Stage.UPDATE_STAGE_FAILED, f"rollback refused: {e}", command_id
            )
            return
        old = self.serving.swap(worker, target.ref())
        await self.faults.at_async("rolling_back")
        self.state.current, self.state.previous, self.state.pending = target.ref(), current, None
        if command_id:
            self.state.rollbacks_done = [*self.state.rollbacks_done[-31:], command_id]
        self.store.save(self.state)
        self._wanted = target.path
        self._queue_event(target.path, Stage.UPDATE_STAGE_ROLLED_BACK, reason, command_id)
        self._queue_status()
        if old is not None:
            self._spawn(asyncio.to_thread(old.retire))

    async def _supervise_worker(self) -> None:
        """Restarts a model worker that died; a model whose worker keeps dying goes back to the previous one."""
        worker, ref = self.serving.worker, self.serving.ref
        # The worker in the serving slot is never retired (a swap replaces the slot first), so a closed one
        # was killed: by a call that timed out, or by the system.
        if worker is None or worker.alive() or self._update_lock.locked():
            return
        path = ref["target_path"]
        now = time.monotonic()
        crashes = [t for t in self._worker_crashes.get(path, []) if now - t < WORKER_CRASH_WINDOW_S] + [now]
        self._worker_crashes[path] = crashes
        log.error(
            "the model worker for %s died (%d time(s) in %.0f s)", path, len(crashes), WORKER_CRASH_WINDOW_S
        )
        async with self._update_lock:
            if len(crashes) >= MAX_WORKER_CRASHES and self.state.previous is not None:
                self._mark_bad(path, f"its worker process died {len(crashes)} times")
                await self._switch_to_previous(
                    "", f"automatic rollback: {path} keeps crashing", ordered=False
                )
                return
            try:
                target = await asyncio.to_thread(self._load_local_target, ref)
                fresh = await asyncio.to_thread(
                    self._test_candidate, target, self.store.model_path(target.sha256)
                )
            except errors.EdgefleetError as e:
                log.error("cannot restart %s: %s", path, e)
                return
            self.serving.swap(fresh, ref)

    # ---- inference and telemetry -----------------------------------------------------------------------

    def infer(self, inputs: list[np.ndarray]) -> Result:
        """The in-process API: thread-safe, blocking. See `Serving.infer` for what it raises."""
        return self.serving.infer(inputs)

    def capabilities(self) -> common_pb2.Capabilities:
        memory = psutil.virtual_memory()
        available = self.config.memory_available_override_bytes or memory.available
        return common_pb2.Capabilities(
            runtime=self.runtime,
            runtime_version=runtime_version(self.runtime),
            cpu_arch=platform.machine(),
            cpu_count=os.cpu_count() or 1,
            memory_total_bytes=self.config.memory_available_override_bytes or memory.total,
            memory_available_bytes=available,
            disk_free_bytes=psutil.disk_usage(str(self.store.folder)).free,
            accelerators=list(self.config.accelerators),
            hardware_class=self.config.hardware_class,
            latency_budget_ms=self.config.latency_budget_ms,
        )

    async def _send_telemetry(self) -> None:
        """Sends queued reports one at a time; honours the server's retry hint when it is rate-limited."""
        assert self._stub is not None
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        while True:
            report = await self.outbox.get_telemetry()
            report.dropped_reports = self.outbox.dropped
            try:
                await self._stub.ReportTelemetry(
                    device_pb2.ReportTelemetryRequest(report=report),
                    metadata=self._metadata,
                    timeout=self.config.rpc_timeout_s,
                )
                self.outbox.dropped = 0
                backoff.reset()
                continue
            except grpc.aio.AioRpcError as e:
                if e.code() not in _RETRYABLE:
                    log.warning("telemetry report refused: %s %s", e.code().name, e.details())
                    continue
                hint = dict(e.trailing_metadata() or ()).get("retry-after-ms")
                delay = int(hint) / 1000 if hint and str(hint).isdigit() else backoff.next()
            self.outbox.put_telemetry(report, front=True)
            await asyncio.sleep(min(delay, self.config.backoff_max_s))

    async def _collect_telemetry(self) -> None:
        report = device_pb2.TelemetryReport(at_unix_ms=now_ms())
        memory = psutil.virtual_memory()
        report.health.cpu_percent = psutil.cpu_percent(interval=None)
        report.health.memory_used_bytes = memory.total - memory.available
        report.health.memory_total_bytes = memory.total
        report.health.disk_free_bytes = psutil.disk_usage(str(self.store.folder)).free
        report.health.uptime_seconds = time.time() - psutil.boot_time()
        temperature = _temperature()
        if temperature is not None:
            report.health.temperature_celsius = temperature
        for target, stats in self.serving.take_stats().items():
            report.inference.add(
                target_path=target,
                count=stats.count,
                errors=stats.errors,
                latency_bounds_ms=LATENCY_BOUNDS_MS,
                latency_counts=stats.buckets,
                latency_sum_ms=stats.latency_sum_ms,
                latency_max_ms=stats.latency_max_ms,
            )
        self.outbox.put_telemetry(report)


def _verifies(target: ModelTarget, path: Path) -> bool:
    try:
        verify_file(target.target, path)
        return True
    except errors.HashMismatchError:
        path.unlink(missing_ok=True)
        return False


def _temperature() -> float | None:
    sensors: Callable[[], dict[str, Any]] | None = getattr(psutil, "sensors_temperatures", None)
    if sensors is None:
        return None
    try:
        readings = [t.current for entries in sensors().values() for t in entries if t.current]
    except (OSError, RuntimeError):
        return None
    return max(readings) if readings else None
