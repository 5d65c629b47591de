"""The install pipeline: from an assignment to a model that serves.

    assignment -> refresh signed metadata (python-tuf) -> compatible? not a forbidden downgrade?
               -> download with resume (cut at the signed length) -> check length + sha256, decode, commit
               -> candidate in its own process: tensor signature + golden output
               -> activate (the state file is the commit point, then one swap) -> probation (`supervision`)

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
from edgefleet.agent.serving import ModelWorker, Serving
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
        self._applying: set[str] = set()  # targets with an update loop running
        self._refused: dict[str, str] = {}  # target -> why, for refusals that a new signature may lift

    async def apply_assignment(self, ref: ModelRef | None) -> None:
        """Installs the assigned model, retrying what is worth retrying (see the module docstring)."""
        if ref is None or ref.target_path in self._applying:
            return  # a loop for this target is already at work
        path = ref.target_path
        self.turn.wanted = path
        self._applying.add(path)
        try:
            await self._apply_loop(path)
        finally:
            self._applying.discard(path)

    async def _apply_loop(self, path: str) -> None:
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        reported = ""
        while self.turn.wanted == path and not self.stopping.is_set():
            async with self.turn.lock:
                if self.turn.wanted != path:
                    return  # a newer assignment or a rollback came while this one waited for the lock
                state = self.store.state
                if state.current and state.current.target_path == path:
                    return
                if path in state.bad_targets:
                    log.info("not installing %s: it failed here before (listed as bad)", path)
                    return
                try:
                    await self._install(path)
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

    async def _install(self, path: str) -> None:
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
            self.control.queue_event(path, "verified", "signed metadata, length and sha256 check out")
            await asyncio.to_thread(self.models.test_candidate, target, worker)
        except BaseException:
            worker.kill()
            raise
        await self._activate(target, worker)

    async def _download(self, target: ModelTarget) -> None:
        """Appends to downloads/<sha>.part from its current length; never keeps more than the signed length.
        Raises TransportError when the stream fails, stalls or ends short."""
        connection = self.control.connection
        assert connection is not None
        part = self.store.download_path(target.sha256)
        offset = part.stat().st_size if part.exists() else 0
        if offset > target.wire_length:
            part.unlink()
            offset = 0
        log.info("downloading %s from byte %d of %d", target.path, offset, target.wire_length)
        with open(part, "ab") as f:
            call = connection.stub.DownloadModel(
                device_pb2.DownloadModelRequest(target_path=target.path, offset=offset),
                metadata=connection.metadata,
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

    async def _activate(self, target: ModelTarget, worker: ModelWorker) -> None:
        state = self.store.state
        previous = decisions.previous_after_activation(state.current, state.previous, target.path)
        new_state = dataclasses.replace(
            state,
            current=target.ref(),
            previous=previous,
            pending=Pending(target.path, now_ms()),
            floors=decisions.raised_floors(state.floors, target.name, target.sequence),
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
