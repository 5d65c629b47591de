"""Keeping the running model healthy: the model at start, probation after a swap, rollback, and the worker.

    start      -> the model the state file says runs (the state file is the commit point of every update);
                  a pending update restarted too often goes back; a lost local copy is fetched again
    probation  -> healthy after `probation_s` with no failed inference and the golden output still right,
                  otherwise back to the previous model and the version marked bad
    rollback   -> the previous model from its local copy, no download; an operator's order only when
                  signed metadata allows that version (rollback floors), or, for an order naming a rollout,
                  when the operator's permit for that rollout covers this device's candidate and previous
    shadow     -> dropped by a rollback (and by a new assignment, in `updates`)
    every 1 s  -> a model worker that died is restarted; one that keeps dying means the model goes back

What to do is decided in `edgefleet.agent.decisions`; this module fetches, persists and acts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from edgefleet import errors
from edgefleet.agent import decisions
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.control import Control, Spawn
from edgefleet.agent.faults import Faults
from edgefleet.agent.local_models import UNUSABLE, LocalModels
from edgefleet.agent.serving import ModelWorker, Serving
from edgefleet.agent.state import StateStore
from edgefleet.device_trust import DeviceTrust
from edgefleet.model_targets import ModelTarget
from edgefleet.values import ModelRef

log = logging.getLogger("edgefleet.agent")


class UpdateTurn:
    """One update or rollback at a time (`lock`), and the target the newest order wants (`wanted`): an older
    retry loop gives way to it."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.wanted = ""


class Supervisor:
    def __init__(
        self,
        config: AgentConfig,
        store: StateStore,
        models: LocalModels,
        serving: Serving,
        trust: DeviceTrust,
        control: Control,
        faults: Faults,
        turn: UpdateTurn,
        spawn: Spawn,
    ):
        self.config = config
        self.store = store
        self.models = models
        self.serving = serving
        self.trust = trust
        self.control = control
        self.faults = faults
        self.turn = turn
        self.spawn = spawn
        self._worker_crashes: dict[str, list[float]] = {}  # target -> monotonic times its worker died
        # Set by the agent: fetches a model again whose local copy was lost (the update pipeline).
        self.refetch: Callable[[ModelRef], Coroutine[Any, Any, None]] | None = None

    def mark_bad(self, path: str, reason: str) -> None:
        """Never tried again; reported with the reason, and in every status from now on."""
        state = self.store.state
        state.bad_targets = decisions.with_bad_target(state.bad_targets, path)
        self.store.save()
        self.control.queue_event(path, "failed", reason)
        self.control.queue_status()

    def retire_later(self, old: ModelWorker | None) -> None:
        if old is not None:
            self.spawn(asyncio.to_thread(old.retire))

    # ---- the model at start ----------------------------------------------------------------------------

    async def start_current_model(self) -> None:
        """Starts the model the state says runs; a file that fails its hash never runs and is re-fetched.

        The state file is the commit point of every update, so after a kill at any instant this runs either
        the old model or the new one, whole, and the first status report says which."""
        for leftover in (self.store.folder / "models").glob("*.tmp"):  # a decode cut short by a kill
            leftover.unlink(missing_ok=True)
        if self.store.damaged:
            await asyncio.to_thread(self._rebuild_floors)
        state = self.store.state
        if state.pending and state.previous:
            state.pending = pending = dataclasses.replace(state.pending, starts=state.pending.starts + 1)
            self.store.save()
            if decisions.gives_up_at_start(pending.starts):
                # The new model keeps taking the agent down before it can be called healthy: go back.
                bad = pending.target_path
                state.current, state.previous, state.pending = state.previous, None, None
                self.store.save()
                self.mark_bad(
                    bad, f"the agent restarted {decisions.MAX_STARTS_IN_PROBATION} times during its probation"
                )
                self.control.queue_event(
                    state.current.target_path,
                    "rolled_back",
                    f"automatic rollback: {bad} never completed its probation",
                )
        current, previous = state.current, state.previous
        if previous is not None and not await asyncio.to_thread(self.models.usable, previous):
            state.previous = previous = None
            self.store.save()
        if current is None:
            return
        try:
            target, worker = await asyncio.to_thread(self.models.start, current)
        except UNUSABLE as e:
            await self._lost_local_copy(current, e)
            return
        self.serving.swap(worker, target.ref())
        if not state.pending:
            # Re-confirm after a restart: a "healthy" report in flight at a kill is not lost.
            self.control.queue_event(target.path, "healthy", "checked again at start")
        else:
            self.spawn(self._resume_probation(current.target_path))

    def _rebuild_floors(self) -> None:
        """After a damaged state file: the floors against downgrades come back from the verified local models
        (a lost floor would let a server send the device back to a version it has moved past). Nothing is
        made current: the server's assignment installs it again, checked like any update."""
        state = self.store.state
        for target in self.models.verified_on_disk():
            state.floors = decisions.raised_floors(state.floors, target.name, target.sequence)
        self.store.save()
        self.store.damaged = False
        log.warning("state rebuilt from the verified models on disk: floors %s", state.floors)

    async def _lost_local_copy(self, ref: ModelRef, error: Exception) -> None:
        """A local copy that does not verify (planted, damaged, no longer signed) never runs: say so, serve the
        previous model meanwhile (the truth goes in the status), and fetch the lost one again: the bytes come
        back verified."""
        log.error("local copy of %s refused, it will not run: %s", ref.target_path, error)
        self.models.forget(ref)
        self.control.queue_event(ref.target_path, "failed", f"local copy unusable: {error}")
        state = self.store.state
        previous = state.previous if state.previous != ref else None
        state.current, state.previous, state.pending = previous, None, None
        self.store.save()
        if previous is not None:
            await self._serve_local(previous)
        if self.refetch is not None:
            self.spawn(self.refetch(ref))

    async def _serve_local(self, ref: ModelRef) -> None:
        try:
            target, worker = await asyncio.to_thread(self.models.start, ref)
        except UNUSABLE as e:
            log.error("model %s is unusable too: %s", ref.target_path, e)
            self.store.state.current = None
            self.store.save()
            return
        self.serving.swap(worker, target.ref())

    async def _resume_probation(self, path: str) -> None:
        """Killed during a probation: finish it, under the update lock like any update."""
        async with self.turn.lock:
            state = self.store.state
            if state.pending and state.pending.target_path == path and state.current:
                await self.probation(state.current, state.previous)

    # ---- probation -------------------------------------------------------------------------------------

    async def probation(self, ref: ModelRef, previous: ModelRef | None) -> None:
        """Healthy after `probation_s` with no failed inference and the golden output still right;
        otherwise back to the previous model and this version is bad."""
        path = ref.target_path
        before = decisions.Totals(*self.serving.totals(path))
        worker = self.serving.worker
        deadline = time.monotonic() + self.config.probation_s
        problem = ""
        while time.monotonic() < deadline and not problem:
            # Checked often: a model that fails goes back within a fraction of a second, not at the end.
            await asyncio.sleep(min(0.2, self.config.probation_s))
            current = self.store.state.current
            if current is None or current.target_path != path:
                return  # replaced meanwhile (a rollback)
            problem = decisions.probation_problem(
                before,
                decisions.Totals(*self.serving.totals(path)),
                worker_alive=worker is None or worker.alive(),
            )
            if problem and worker is not None and not worker.alive():
                self.serving.count_worker(path, crashed=True)
        after = decisions.Totals(*self.serving.totals(path))
        if not problem:
            golden_error = None
            try:
                target = await asyncio.to_thread(self.models.local_target, ref)
                result = await asyncio.to_thread(self.serving.infer, list(target.golden.inputs))
                target.golden.check(result.outputs)
            except errors.EdgefleetError as e:
                golden_error = str(e)
            problem = decisions.golden_problem(golden_error)
        state = self.store.state
        if not problem:
            state.pending = None
            self.store.save()
            await self.faults.at_async("committed")
            await asyncio.to_thread(self.models.prune)
            self.control.queue_event(path, "healthy", decisions.healthy_reason(before, after))
            return
        self.mark_bad(path, problem)
        if previous is not None:
            await self._switch_to_previous("", f"automatic rollback: {problem}", ordered=False)
        if state.pending and state.pending.target_path == path:
            state.pending = None  # no way back: it keeps serving, marked bad, not re-tried at each start
            self.store.save()

    # ---- rollback --------------------------------------------------------------------------------------

    async def rollback(self, command_id: str, reason: str, rollout_id: str = "") -> None:
        """An operator's order: back to the previous model from its local copy (no download) and report it.
        Obeyed only when signed metadata allows the previous version (`decisions.check_not_downgrade`), or,
        naming a rollout, when its signed permit does (`decisions.check_rollout_rollback`). Never deferred;
        a shadow candidate is dropped."""
        async with self.turn.lock:
            # Under the lock: a shadow that finished loading while the order waited goes too.
            await self.drop_shadow("a rollback was ordered")
            if command_id and command_id in self.store.state.rollbacks_done:
                self.control.queue_status()  # already obeyed: say so again, do not go back twice
                return
            await self._switch_to_previous(command_id, reason, ordered=True, rollout_id=rollout_id)

    async def drop_shadow(self, why: str) -> None:
        """Stops comparing with the shadow candidate and stops its worker; its local copy goes at the next
        prune. Nothing happens when there is none."""
        shadow, self.serving.shadow = self.serving.shadow, None
        state = self.store.state
        if state.shadow is not None:
            state.shadow = None
            self.store.save()
        if shadow is not None:
            log.info("shadow %s dropped: %s", shadow.ref.target_path, why)
            await asyncio.to_thread(shadow.stop)
            self.control.queue_status()

    def _check_rollout_permit(self, rollout_id: str, current: ModelRef | None, previous: ModelTarget) -> None:
        """Raises DowngradeRefusedError unless the verified targets metadata permits this return."""
        if current is None:
            raise errors.DowngradeRefusedError("no model runs here to go back from")
        running = self.models.local_target(current)
        decisions.check_rollout_rollback(
            rollout_id,
            self.trust.rollout_permits,
            current_name=running.name,
            current_sequence=running.sequence,
            previous_name=previous.name,
            previous_sequence=previous.sequence,
        )

    def check_not_downgrade(self, target: ModelTarget) -> None:
        """Raises DowngradeRefusedError for an older version the operator's signature does not allow."""
        decisions.check_not_downgrade(
            target.path,
            target.name,
            target.sequence,
            floors=self.store.state.floors,
            rollback_floors=self.trust.rollback_floors,
        )

    async def _switch_to_previous(
        self, command_id: str, reason: str, *, ordered: bool, rollout_id: str = ""
    ) -> None:
        state = self.store.state
        previous, current = state.previous, state.current
        if previous is None:
            self.control.queue_event(
                current.target_path if current else "",
                "failed",
                "rollback impossible: no previous model on this device",
                command_id,
            )
            return
        try:
            target = await asyncio.to_thread(self.models.local_target, previous)
            if ordered:
                # The order came through the server; the permission must come from the operator's key.
                await asyncio.to_thread(self.trust.target, target.path)
                if rollout_id:
                    self._check_rollout_permit(rollout_id, current, target)
                else:
                    self.check_not_downgrade(target)
            worker = await asyncio.to_thread(self.models.test_candidate, target)
        except errors.EdgefleetError as e:
            self.control.queue_event(previous.target_path, "failed", f"rollback refused: {e}", command_id)
            return
        old = self.serving.swap(worker, target.ref())
        await self.faults.at_async("rolling_back")
        state.current, state.previous, state.pending = target.ref(), current, None
        if command_id:
            state.rollbacks_done = decisions.with_rollback_done(state.rollbacks_done, command_id)
        self.store.save()
        self.turn.wanted = target.path
        self.control.queue_event(target.path, "rolled_back", reason, command_id)
        self.control.queue_status()
        self.retire_later(old)

    # ---- the worker ------------------------------------------------------------------------------------

    async def supervise_worker(self) -> None:
        """Restarts a model worker that died; a model whose worker keeps dying goes back to the previous one."""
        worker, ref = self.serving.worker, self.serving.ref
        # The worker in the serving slot is never retired (a swap replaces the slot first), so a closed one
        # was killed: by a call that timed out, or by the system.
        if worker is None or ref is None or worker.alive() or self.turn.lock.locked():
            return
        current = self.store.state.current
        if current is None or current.target_path != ref.target_path:
            return  # its local copy was refused: an update brings the model back
        path = ref.target_path
        self.serving.count_worker(path, crashed=True)
        crashes = decisions.recent_crashes(self._worker_crashes.get(path, []), time.monotonic())
        self._worker_crashes[path] = crashes
        log.error(
            "the model worker for %s died (%d time(s) in %.0f s)",
            path,
            len(crashes),
            decisions.WORKER_CRASH_WINDOW_S,
        )
        async with self.turn.lock:
            if decisions.crashes_mean_rollback(len(crashes), self.store.state.previous is not None):
                self.mark_bad(path, f"its worker process died {len(crashes)} times")
                await self._switch_to_previous(
                    "", f"automatic rollback: {path} keeps crashing", ordered=False
                )
                return
            try:
                _, fresh = await asyncio.to_thread(self.models.start, ref)
            except errors.EdgefleetError as e:
                if e.marks_bad:  # the verified bytes do not load: counted as a crash, tried again
                    log.error("cannot restart %s: %s", path, e)
                else:  # the local copy changed under the running model: it never runs again
                    await self._lost_local_copy(ref, e)
                return
            self.serving.swap(fresh, ref)
            self.serving.count_worker(path, restarted=True)
