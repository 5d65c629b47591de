"""The device agent: one asyncio program that keeps the device's model current, safe and observable.

`Agent` owns the state and wires the parts, one job each:

    connection   enroll (first start), then the one channel to the server
    supervision  serve the current model at start; probation, rollback, worker restarts
    control      the control stream (status first on every connect, events, orders) and python-tuf's
                 metadata bridge
    updates      assignment -> signed metadata -> download with resume -> verify -> candidate -> activate
    telemetry    health + inference histograms every N s, through the bounded outbox
    local_api    inference for applications on the device (a Unix socket)
    decisions    what each of them should do, as pure functions

Blocking work (metadata verification, hashing, decompression, process start) runs in threads; inference
runs in model worker processes (`edgefleet.agent.serving`). Every stage is reported to the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import numpy as np
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from edgefleet import pki
from edgefleet.agent import decisions
from edgefleet.agent.certificates import CertificateRenewer
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.connection import connect
from edgefleet.agent.control import Control
from edgefleet.agent.exits import ConfigCannotWorkError, DeviceRevokedError
from edgefleet.agent.faults import Faults
from edgefleet.agent.local_api import LocalStatus, start_local_service
from edgefleet.agent.local_models import LocalModels
from edgefleet.agent.serving import Result, Serving
from edgefleet.agent.state import AgentState, StateStore, now_ms
from edgefleet.agent.supervision import Supervisor, UpdateTurn
from edgefleet.agent.telemetry import Outbox, Telemetry, read_capabilities
from edgefleet.agent.updates import Updater
from edgefleet.convert import capabilities_to_proto
from edgefleet.device_trust import DeviceTrust
from edgefleet.errors import IncompatibleError
from edgefleet.process_lock import LockHeldError, ProcessLock
from edgefleet.runtime import available_runtimes, default_runtime, runtime_version
from edgefleet.v1 import common_pb2
from edgefleet.values import Capabilities, ModelRef

log = logging.getLogger("edgefleet.agent")
T = TypeVar("T")


def _runtime_for(config: AgentConfig) -> str:
    """The TFLite runtime to use, checked now: a missing one is a configuration that cannot work."""
    if not config.runtime:
        try:
            return default_runtime()
        except IncompatibleError as e:
            raise ConfigCannotWorkError(f"{e} (or tflite-runtime)") from e
    installed = available_runtimes()
    if config.runtime not in installed:
        raise ConfigCannotWorkError(
            f"runtime {config.runtime!r} is not installed here (installed: {', '.join(installed) or 'none'})"
        )
    return config.runtime


def _lock_state_dir(config: AgentConfig) -> ProcessLock:
    """One agent per state dir: two would fight over one identity and flap its connection.
    Raises ConfigCannotWorkError naming the other agent's pid."""
    try:
        return ProcessLock(config.state_dir / "agent.lock").acquire()
    except LockHeldError as e:
        holder = f" (pid {e.pid})" if e.pid else ""
        raise ConfigCannotWorkError(f"another agent{holder} already runs on {config.state_dir}") from e
    except OSError as e:
        raise ConfigCannotWorkError(f"cannot use the state dir {config.state_dir}: {e}") from e


class Agent:
    """One device's agent. `run()` until `stop()`; `infer` for applications in this process; `state` is the
    live state (what runs, what ran before, what is bad), kept by `store`."""

    def __init__(self, config: AgentConfig):
        self.config = config
        self.runtime = _runtime_for(config)
        self.store = StateStore(config.state_dir)
        self.serving = Serving(call_timeout=config.inference_timeout_s)
        self.outbox = Outbox(config.telemetry_queue_size)
        self.faults = Faults.from_env()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._scheduler: AsyncIOScheduler | None = None
        self._local: grpc.aio.Server | None = None
        self._lock: ProcessLock | None = None
        self._renewer: CertificateRenewer | None = None
        self.control = Control(
            config, self.store, self.outbox, self._capabilities, self._spawn, self._stopping
        )
        self.trust = DeviceTrust(self.store.folder / "metadata", self.control.get_metadata_blocking)
        self.telemetry = Telemetry(config, self.serving, self.outbox, self.store.folder)
        models = LocalModels(config, self.runtime, self.store, self.trust, self.faults)
        turn = UpdateTurn()
        self.supervisor = Supervisor(
            config, self.store, models, self.serving, self.trust, self.control, self.faults, turn, self._spawn
        )
        self.updater = Updater(
            config,
            self.runtime,
            self.store,
            models,
            self.serving,
            self.trust,
            self.control,
            self.supervisor,
            self.faults,
            turn,
            self._stopping,
        )
        self.supervisor.refetch = self.updater.apply_assignment
        self.control.on_assignment = self._on_assignment
        self.control.on_rollback = self._on_rollback

    @property
    def state(self) -> AgentState:
        return self.store.state

    @property
    def connected(self) -> bool:
        return self.control.connected

    @property
    def device_id(self) -> str:
        return self.control.connection.device_id if self.control.connection else ""

    # ---- lifecycle -------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Runs until `stop()`. Raises EdgefleetError when the agent cannot start (what to fix is in it)."""
        self.control.loop = asyncio.get_running_loop()
        self._lock = _lock_state_dir(self.config)
        try:
            connection = await self._unless_stopped(
                connect(self.config, self.store, self.trust, self.capabilities)
            )
            if connection is None:
                return  # stopped while enrolling or connecting
            self.control.connection = self.telemetry.connection = connection
            self._renewer = CertificateRenewer(
                self.config, pki.TlsFiles(self.store.folder / "tls"), connection
            )
            self._spawn(self._check_certificate())  # at start, without holding up local serving
            await self.supervisor.start_current_model()
            if self.config.socket_path or self.config.local_port:
                self._local = await start_local_service(self, self.config.socket_path, self.config.local_port)
            self._scheduler = AsyncIOScheduler()
            self._scheduler.add_job(
                self.control.periodic_check, "interval", seconds=self.config.check_interval_s
            )
            self._scheduler.add_job(
                self.supervisor.supervise_worker, "interval", seconds=1.0, max_instances=1
            )
            self._scheduler.add_job(
                self.telemetry.collect, "interval", seconds=self.config.telemetry_interval_s
            )
            self._scheduler.add_job(
                self._check_certificate, "interval", seconds=self.config.certificate_check_interval_s
            )
            self._scheduler.start()
            self._spawn(self.telemetry.send())
            await self.control.run()
        finally:
            await self._shutdown()

    def stop(self) -> None:
        self._stopping.set()

    async def _check_certificate(self) -> None:
        if self._renewer is None:
            return
        try:
            await self._renewer.check()
        except DeviceRevokedError:
            pass  # the control stream meets the same refusal and stops the agent

    async def _unless_stopped(self, work: Coroutine[Any, Any, T]) -> T | None:
        """`work`'s result, or None once `stop()` is called first (then `work` is cancelled): a signal stops the
        agent promptly in every state, the enrollment loop included."""
        task = asyncio.ensure_future(work)
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None

    async def _shutdown(self) -> None:
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        for task in list(self._tasks):
            task.cancel()
        if self._local is not None:
            await self._local.stop(1)
        await asyncio.to_thread(self.serving.stop)
        if self.control.connection is not None:
            await self.control.connection.close()
        if self._lock is not None:
            self._lock.release()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed: %r", task.exception(), exc_info=task.exception())

    def _on_assignment(self, ref: ModelRef | None, shadow: bool, retry_order: str) -> None:
        self._spawn(self.updater.apply_assignment(ref, shadow, retry_order))

    def _on_rollback(self, command_id: str, reason: str, rollout_id: str) -> None:
        self._spawn(self.supervisor.rollback(command_id, reason, rollout_id))

    # ---- what applications and the server see ----------------------------------------------------------

    def infer(self, inputs: list[np.ndarray]) -> Result:
        """The in-process API: thread-safe, blocking. See `Serving.infer` for what it raises."""
        return self.serving.infer(inputs)

    def local_status(self) -> LocalStatus:
        return LocalStatus(
            current=self.state.current,
            previous=self.state.previous,
            runtime=self.runtime,
            runtime_version=runtime_version(self.runtime),
            connected=self.connected,
            shadow=self.serving.shadow.ref if self.serving.shadow else None,
            deferred_until_ms=self.state.deferred_until_ms if self.state.deferred_until_ms > now_ms() else 0,
        )

    def defer_updates(self, seconds: int, reason: str) -> decisions.Deferral:
        """An application on the device is busy: no install starts for up to `seconds` (bounded by the
        config), persisted before it is answered. Raises InvalidRequestError for a negative request."""
        state = self.state
        deferral = decisions.grant_deferral(
            seconds,
            now_ms(),
            until_ms=state.deferred_until_ms,
            used_s=state.deferred_used_s,
            max_per_request_s=self.config.max_deferral_s,
            max_total_s=self.config.max_deferral_total_s,
        )
        state.deferred_until_ms, state.deferred_used_s = deferral.until_ms, deferral.used_s
        self.store.save()
        log.info("installs deferred for %d s (asked %d s): %s", deferral.granted_s, seconds, reason[:200])
        return deferral

    def _capabilities(self) -> Capabilities:
        return read_capabilities(self.config, self.runtime, self.store.folder)

    def capabilities(self) -> common_pb2.Capabilities:
        return capabilities_to_proto(self._capabilities())
