"""The install pipeline: from an assignment to a model that serves.

    assignment -> refresh signed metadata (python-tuf) -> compatible? not a forbidden downgrade?
               -> download with resume (cut at the signed length) -> check length + sha256, decode, commit
               -> candidate in its own process: tensor signature + golden output
               -> activate (the state file is the commit point, then one swap) -> probation (`supervision`)
    shadow assignment -> the same, up to the candidate test -> loaded beside the serving model, "shadow_ready"
               (`edgefleet.agent.shadow`); the same model assigned later without shadow serves, through its
               already loaded worker when it can be handed over
    deferral   -> an application asked (local API DeferUpdates): an install waits, reported once as
               "deferred", and starts when the deferral ends; a shadow load is not an install and goes on

Transport failures, bytes that do not hash (a tampered blob, a spliced resume: the partial file is deleted,
so the retry starts at byte 0), a target nobody signed, expired metadata and a full disk are retried with
capped backoff until it works or a newer assignment replaces it, and reported once per kind of trouble. Only
what verified bytes do (golden check, tensor contract, a crash or hang of the interpreter) or what their
signed fields say marks the version bad; a downgrade without an operator's signature is refused until the
metadata changes. What each error means is `decisions.after_install_error`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os

import grpc

from edgefleet import errors
from edgefleet.agent import decisions
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.connection import Backoff
from edgefleet.agent.control import Control
from edgefleet.agent.faults import Faults
from edgefleet.agent.local_models import LocalModels
from edgefleet.agent.outputs import Quantization
from edgefleet.agent.serving import ModelWorker, Serving
from edgefleet.agent.shadow import Shadow, ShadowLimits
from edgefleet.agent.state import Pending, StateStore, now_ms
from edgefleet.agent.supervision import Supervisor, UpdateTurn
from edgefleet.device_trust import DeviceTrust
from edgefleet.model_targets import ModelTarget
from edgefleet.v1 import device_pb2
from edgefleet.values import ModelRef

log = logging.getLogger("edgefleet.agent")


class Updater:
    def __init__(
        self,
        config: AgentConfig,
        runtime: str,
        store: StateStore,
        models: LocalModels,
        serving: Serving,
        trust: DeviceTrust,
        control: Control,
        supervisor: Supervisor,
        faults: Faults,
        turn: UpdateTurn,
        stopping: asyncio.Event,
    ):
        self.config = config
        self.runtime = runtime
        self.store = store
        self.models = models
        self.serving = serving
        self.trust = trust
        self.control = control
        self.supervisor = supervisor
        self.faults = faults
        self.turn = turn
        self.stopping = stopping
        self._applying: set[tuple[str, bool]] = set()  # (target, shadow) with an update loop running
        self._refused: dict[str, str] = {}  # target -> why, for refusals that a new signature may lift
        self._retries_refused: set[str] = set()  # retry orders refused (beyond the bound), reported once

    async def apply_assignment(
        self, ref: ModelRef | None, shadow: bool = False, retry_order: str = ""
    ) -> None:
        """Installs the assigned model (or loads it in shadow), retrying what is worth retrying (see the
        module docstring). An assignment of another model drops a shadow candidate. `retry_order` (an
        operator's retry-failed order) may lift the model's bad mark first (`decisions.retry_lift`)."""
        if ref is None:
            return
        path = ref.target_path
        if retry_order:
            self._lift_for_retry(path, retry_order)
        running, kept = self.serving.shadow, self.store.state.shadow  # kept: a copy from before a restart
        shadowed = running.ref.target_path if running else kept.target_path if kept else ""
        if shadowed and shadowed != path:
            await self.supervisor.drop_shadow(f"assignment of {path}")
        if (path, shadow) in self._applying:
            return  # a loop for this target is already at work
        self.turn.wanted = path
        self._applying.add((path, shadow))
        try:
            await self._apply_loop(path, shadow)
        finally:
            self._applying.discard((path, shadow))

    def _lift_for_retry(self, path: str, order_id: str) -> None:
        """Takes `path` off the bad list when the retry order may (saved before anything installs: a
        restart never lifts twice for one order); the install then goes as usual, and a failure lists it
        as bad again while the old model keeps serving."""
        state = self.store.state
        lifted = state.retries.get(path, [])
        decision = decisions.retry_lift(
            path, order_id, retry=True, bad_targets=state.bad_targets, lifted_for=lifted
        )
        if decision.why:
            log.info("%s", decision.why)
        if not decision.lift:
            if decision.why and order_id not in lifted and order_id not in self._retries_refused:
                self._retries_refused.add(order_id)  # the operator sees why the device stays failed
                self.control.queue_event(path, "failed", decision.why)
            return
        # In place, as mark_bad does: every part of the agent holds this one state object.
        retries = {t: orders for t, orders in state.retries.items() if t != path}
        retries[path] = [*lifted, order_id]  # the newest last: the oldest targets are forgotten first
        while len(retries) > decisions.MAX_BAD_TARGETS:
            del retries[next(iter(retries))]
        state.retries = retries
        state.bad_targets = [t for t in state.bad_targets if t != path]
        self.store.save()
        self._refused.pop(path, None)
        self.control.queue_status()  # the server's view of the bad list

    def _done(self, path: str, shadow: bool) -> bool:
        state = self.store.state
        if path in state.bad_targets:
            log.info("not installing %s: it failed here before (listed as bad)", path)
            return True
        if state.current and state.current.target_path == path:
            return True
        running = self.serving.shadow
        return shadow and running is not None and running.ref.target_path == path

    async def _wait_for_deferral(self, path: str) -> None:
        """While an application defers installs: report it once, then wait (a shorter or cancelled deferral
        is seen within a second)."""
        reported = False
        while self.turn.wanted == path and not self.stopping.is_set():
            left_ms = self.store.state.deferred_until_ms - now_ms()
            if left_ms <= 0:
                return
            if not reported:
                reported = True
                self.control.queue_event(
                    path, "deferred", f"an application deferred installs for {left_ms / 1000:.0f} s"
                )
            await asyncio.sleep(min(1.0, left_ms / 1000))

    async def _apply_loop(self, path: str, shadow: bool = False) -> None:
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        reported = ""
        while self.turn.wanted == path and not self.stopping.is_set():
            if self._done(path, shadow):
                return
            if not shadow:
                await self._wait_for_deferral(path)
            async with self.turn.lock:
                if self.turn.wanted != path:
                    return  # a newer assignment or a rollback came while this one waited for the lock
                if self._done(path, shadow):
                    return
                try:
                    await self._install(path, shadow)
                    return
                except errors.EdgefleetError as e:
                    after = decisions.after_install_error(e)
                    if after is decisions.AfterError.MARK_BAD:
                        self.supervisor.mark_bad(path, str(e))
                        await asyncio.to_thread(self.models.prune)
                        return
                    if after is decisions.AfterError.REFUSE:
                        if self._refused.get(path) != str(e):
                            self._refused[path] = str(e)
                            self.control.queue_event(path, "failed", str(e))
                        return
                    problem = str(e)
                    log.warning("update to %s interrupted: %s", path, problem)
                    if decisions.reports_retry(e) and reported != problem:
                        reported = problem  # report once per kind of trouble, then retry quietly
                        self.control.queue_event(path, "failed", f"will retry: {problem}")
                except OSError as e:
                    problem = f"storage: {e}"
                    log.warning("update to %s interrupted: %s", path, problem)
                    # Disk full or failing: drop the partial download; the old model is untouched.
                    await asyncio.to_thread(self.models.prune)
                    if reported != problem:
                        reported = problem
                        self.control.queue_event(path, "failed", f"will retry: {problem}")
            await asyncio.sleep(backoff.next())

    async def _install(self, path: str, shadow: bool = False) -> None:
        target: ModelTarget = ModelTarget.from_target(await asyncio.to_thread(self.trust.target, path))
        decisions.check_compatible(
            target.path,
            target.runtimes,
            target.hardware_classes,
            runtime=self.runtime,
            hardware_class=self.config.hardware_class,
        )
        self.supervisor.check_not_downgrade(target)
        model_file = self.store.model_path(target.sha256)
        if not shadow and await self._promote_shadow(target):
            return
        # Its process starts now and imports the runtime while we download and verify. It loads at a lower
        # CPU priority while another model serves; with none serving, nothing is there to yield to.
        worker = self.models.new_worker(target.length, low_priority=self.serving.worker is not None).spawn()
        try:
            have = model_file.exists() and await asyncio.to_thread(self.models.verifies, target, model_file)
            if not have:
                self.control.queue_event(path, "downloading")
                await self._download(target)
                await self.faults.at_async("downloaded")
                self.control.queue_event(path, "downloaded")
                await asyncio.to_thread(self.models.finish_file, target)
            await self._fetch_golden(target)
            self.control.queue_event(path, "verified", "signed metadata, length and sha256 check out")
            await asyncio.to_thread(self.models.test_candidate, target, worker)
        except BaseException:
            worker.kill()
            raise
        if shadow:
            await self._start_shadow(target, worker)
        else:
            await self._activate(target, worker)

    async def _start_shadow(self, target: ModelTarget, worker: ModelWorker) -> None:
        if self.turn.wanted != target.path:  # a newer assignment came while it loaded
            worker.kill()
            return
        await self.supervisor.drop_shadow(f"replaced by {target.path}")
        serving = self.serving.worker
        limits = ShadowLimits(
            share=self.config.shadow_share,
            max_per_s=self.config.shadow_max_per_s,
            cpu_budget=self.config.shadow_cpu_budget,
            call_timeout_s=self.config.inference_timeout_s,
        )
        self.serving.shadow = Shadow(
            worker, target.ref(), limits, serving.quantization if serving else Quantization()
        )
        self.store.state.shadow = target.ref()  # only so that prune keeps its copy
        self.store.save()
        self.control.queue_event(
            target.path,
            "shadow_ready",
            f"loaded beside the serving model; up to {limits.max_per_s:g} calls/s, "
            f"CPU budget {limits.cpu_budget:.0%} of a core",
        )
        self.control.queue_status()

    async def _promote_shadow(self, target: ModelTarget) -> bool:
        """The shadow candidate is now assigned to serve: hand its worker over (it passed the candidate test
        on these signed bytes when it loaded) instead of loading it again. False when there is no such
        shadow or its worker cannot be handed over (then the ordinary install loads it afresh)."""
        shadow = self.serving.shadow
        if shadow is None or shadow.ref.sha256 != target.sha256:
            return False
        self.serving.shadow = None
        self.store.state.shadow = None
        worker = await asyncio.to_thread(shadow.detach)
        if worker is None:
            return False
        self.control.queue_event(target.path, "verified", "the shadow candidate serves now")
        await self._activate(target, worker)
        return True

    async def _fetch_golden(self, target: ModelTarget) -> None:
        """Golden data that is a signed file of its own: its target verified through TUF like the model's
        (and matching what the model's signed fields name), downloaded with resume, checked, kept."""
        golden = target.golden_file
        if golden is None or await asyncio.to_thread(self.models.has_golden, target):
            return
        signed = await asyncio.to_thread(self.trust.target, golden.path)
        self.models.check_golden_target(target, signed)
        await self._download_file(golden.path, golden.sha256, golden.length)
        await asyncio.to_thread(self.models.finish_golden, target)

    async def _download(self, target: ModelTarget) -> None:
        await self._download_file(target.path, target.sha256, target.wire_length)

    async def _download_file(self, path: str, sha256: str, wire_length: int) -> None:
        """Appends to downloads/<sha>.part from its current length; never keeps more than the signed length.
        Raises TransportError when the stream fails, stalls or ends short."""
        connection = self.control.connection
        assert connection is not None
        part = self.store.download_path(sha256)
        offset = part.stat().st_size if part.exists() else 0
        if offset > wire_length:
            part.unlink()
            offset = 0
        log.info("downloading %s from byte %d of %d", path, offset, wire_length)
        with open(part, "ab") as f:
            call = connection.stub.DownloadModel(
                device_pb2.DownloadModelRequest(target_path=path, offset=offset),
                metadata=connection.metadata,
            )
            stream = call.__aiter__()
            try:
                while offset < wire_length:
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
                    data = chunk.data[: wire_length - offset]  # cut off at the signed length
                    f.write(data)
                    offset += len(data)
            except grpc.aio.AioRpcError as e:
                # Even NOT_FOUND may be the server's passing fault (a restore): the signed target is not bad.
                raise errors.TransportError(f"download: {e.code().name} {e.details()}") from e
            finally:
                call.cancel()
                f.flush()
                os.fsync(f.fileno())
        if offset < wire_length:
            raise errors.TransportError(f"download ended at {offset} of {wire_length} bytes")

    async def _activate(self, target: ModelTarget, worker: ModelWorker) -> None:
        state = self.store.state
        previous = decisions.previous_after_activation(state.current, state.previous, target.path)
        new_state = dataclasses.replace(
            state,
            current=target.ref(),
            previous=previous,
            pending=Pending(target.path, now_ms()),
            floors=decisions.raised_floors(state.floors, target.name, target.sequence),
            deferred_used_s=0,  # the next assignment may be deferred again, within its own bound
        )
        try:
            self.store.commit(new_state)  # the commit point: from here a restart runs the new model
        except BaseException:
            worker.kill()  # nothing changed: the old model keeps serving
            raise
        old = self.serving.swap(worker, target.ref())
        await self.faults.at_async("activated")
        self.control.queue_event(target.path, "activated")
        self.control.queue_status()
        self.supervisor.retire_later(old)
        await self.supervisor.probation(target.ref(), previous)
