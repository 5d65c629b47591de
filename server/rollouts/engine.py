"""The rollout engine: staged rollouts as a state machine over the database, driven by one asyncio loop.

    start (plan recorded) -> per wave: pending -> soaking -> passed | holding (inconclusive) | failed
    a wave starts only inside a maintenance window and after --start-at; its members are pointed at the
    candidate (a deployment of kind "rollout", told at once when connected, paced by a ramp's rate cap,
    each device only inside its own window when windows are device-local); after its soak, with enough
    healthy devices, `gates.judge` compares it with its control cohort: pass -> the next wave, fail ->
    abort and roll back every device on the candidate, inconclusive -> hold and judge again next tick.

Every decision reads the database and writes its outcome there before it acts, so a restarted server
resumes where it was (soak clocks are timestamps, members and control cohorts were recorded at start).
Operator actions (`actions.py`) and the loop share one lock per engine. Every rollout action and every gate
decision goes to the audit hook with its evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgefleet.server.deployments import (
    ROLLOUT_KIND,
    ROLLOUT_ROLLBACK_KIND,
    Deployments,
    RolloutTag,
    _capabilities_dict,
)
from edgefleet.server.rollouts import claims, evaluate, send_back, windows
from edgefleet.server.rollouts.audit_hook import AuditRecorder, LogRecorder
from edgefleet.server.rollouts.orders import restore_tags, rollout_order, wave_deployment_id
from edgefleet.server.rollouts.plan import Ramp, parse_ramp, place_late_joiner
from edgefleet.server.rollouts.settings import RolloutSettings, install_gate, wave_gates
from edgefleet.server.rollouts.verdicts import Outcome
from edgefleet.server.storage.interfaces import FleetStore
from edgefleet.server.storage.records import Deployment, DeviceRecord, now_ms
from edgefleet.server.storage.rollout_records import (
    MEMBER_STATES,
    MemberRecord,
    RolloutRecord,
    RolloutStore,
    TimelineEntry,
    WaveRecord,
)
from edgefleet.server.streams import AssignmentPush
from edgefleet.server.variants import choose

log = logging.getLogger("edgefleet.server.rollouts")

ENGINE_ACTOR = "rollout-engine"
TRACKED = tuple(s for s in MEMBER_STATES if s != "pending")  # what a device's events can move a member to


@dataclass
class Loaded:
    rollout: RolloutRecord
    settings: RolloutSettings
    waves: list[WaveRecord]
    members: list[MemberRecord]


class RolloutEngine:
    def __init__(
        self,
        store: FleetStore,
        deployments: Deployments,
        recorder: AuditRecorder | None = None,
        *,
        tick_s: float = 1.0,
        clock: Callable[[], int] = now_ms,
    ):
        self.store = store
        self.rollouts: RolloutStore = store.rollouts()
        self.deployments = deployments
        self.recorder: AuditRecorder = recorder or LogRecorder()
        self.tick_s = tick_s
        self.clock = clock
        self.lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._last_outcome: dict[tuple[str, int], str] = {}
        self._waits: dict[tuple[str, str], str] = {}  # (rollout, "utc" | "local") -> the last wait noted
        self._held: dict[tuple[str, int], int] = {}  # (rollout, wave) -> members held by closed windows
        self.last_tick_s = 0.0

    # ---- the loop ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Tags every recorded rollout's deployments (for devices that ask), then runs the loop."""
        tags = await asyncio.to_thread(restore_tags, self.rollouts, self.store)
        self.deployments.rollout_tags.update(tags)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def tag(self, deployment_id: str, rollout_id: str, shadow: bool, retry: bool = False) -> None:
        self.deployments.rollout_tags[deployment_id] = RolloutTag(rollout_id, shadow, retry)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("rollout engine tick failed; trying again")
            await asyncio.sleep(self.tick_s)

    async def tick(self) -> None:
        """One pass over every rollout that is not finished (and completed ones, for late joiners)."""
        started = time.perf_counter()
        async with self.lock:
            rollouts = await asyncio.to_thread(self.rollouts.list_rollouts)
            live = [r for r in rollouts if r.state in ("running", "completed")]
            if live:
                devices = {d.id: d for d in await asyncio.to_thread(self.store.list_devices)}
                for r in live:
                    await self._step(await self.load(r.id), devices)
        self.last_tick_s = time.perf_counter() - started

    async def load(self, rollout_id: str) -> Loaded:
        def read() -> Loaded:
            r = self.rollouts.get_rollout(rollout_id)
            return Loaded(
                r,
                RolloutSettings.from_json(r.settings_json),
                self.rollouts.waves(r.id),
                self.rollouts.members(r.id),
            )

        return await asyncio.to_thread(read)

    async def _step(self, ro: Loaded, devices: dict[str, DeviceRecord]) -> None:
        now = self.clock()
        await self._late_joiners(ro, devices)
        await self._refresh_states(ro, devices)
        utc_open = windows.utc_open(ro.settings.windows, _utc(now))
        if ro.rollout.state == "completed":  # late joiners, inside the windows as any install
            if utc_open:
                await self._assign(ro, ro.waves[-1], devices, now)
            return
        if now < ro.settings.start_at_ms:
            return
        wave = ro.waves[ro.rollout.current_wave]
        # Outside every maintenance window no wave advances and nobody is sent it.
        await self._waiting(
            ro.rollout, "utc", "" if utc_open else windows.utc_waiting(ro.settings.windows, _utc(now))
        )
        if not utc_open:
            self._held[(ro.rollout.id, wave.index)] = sum(
                1 for m in _canary(ro, wave.index) if not m.assigned_ms
            )
        if wave.state == "pending":
            if not utc_open:
                return
            await self._start_wave(ro, wave, now)
        if utc_open:
            await self._assign(ro, wave, devices, now)
        await self._judge(ro, wave, now)

    async def _waiting(self, r: RolloutRecord, kind: str, why: str) -> None:
        """Says on the timeline why the rollout waits, once until the reason changes ("": it no longer
        waits for that, and a wait for it later is said again)."""
        if not why:
            self._waits.pop((r.id, kind), None)
        elif self._waits.get((r.id, kind)) != why:
            self._waits[(r.id, kind)] = why
            await self.note(r, why, {"waiting": kind})

    # ---- waves -------------------------------------------------------------------------------------------

    async def _start_wave(self, ro: Loaded, wave: WaveRecord, now: int) -> None:
        r = ro.rollout
        deployment = rollout_order(r, wave_deployment_id(r.id, wave.index), now)
        changes = []
        if not wave.shadow:  # a shadow wave's devices now serve the candidate with this wave, unless they
            for m in ro.members:  # failed it (they listed it as bad); pending ones (a promoted wave) come too
                shadow_before = m.wave_index < wave.index and ro.waves[m.wave_index].shadow
                if m.role == "canary" and shadow_before and evaluate.install_state(m, True) != "failed":
                    moved = {"wave_index": wave.index, "assigned_ms": 0, "retry_order": ""}
                    changes.append((m.device_id, m.role, moved))
                    m.wave_index, m.assigned_ms, m.retry_order = wave.index, 0, ""
        self.tag(deployment.id, r.id, wave.shadow)

        def write() -> None:
            self.store.add_deployment(deployment, {})
            self.rollouts.update_members(r.id, changes)
            self.rollouts.update_wave(
                r.id, wave.index, state="soaking", started_ms=now, deployment_id=deployment.id
            )

        await asyncio.to_thread(write)
        wave.state, wave.started_ms, wave.deployment_id = "soaking", now, deployment.id
        await self.note(
            ro.rollout,
            f"wave {wave.index} started" + (" (shadow)" if wave.shadow else ""),
            {
                "wave": wave.index,
                "devices": sum(1 for m in _canary(ro, wave.index)),
                "shadow": wave.shadow,
            },
        )
        await self.recorder.record(
            ENGINE_ACTOR, "rollout.wave-start", r.id, {"wave": wave.index, "shadow": wave.shadow}
        )

    def _allowed_now(self, ro: Loaded, wave: WaveRecord, now: int) -> int:
        """How many more installs the ramp's rate cap allows now (no cap: all)."""
        if not ro.settings.ramp:
            return 1 << 30
        ramp: Ramp = parse_ramp(ro.settings.ramp)
        minutes = max(0.0, (now - wave.started_ms) / 60_000.0)
        sent = sum(1 for m in ro.members if m.role == "canary" and m.assigned_ms >= wave.started_ms)
        return max(0, int(ramp.max_per_minute * max(minutes, 1 / ramp.max_per_minute)) - sent + 1)

    async def _assign(self, ro: Loaded, wave: WaveRecord, devices: dict[str, DeviceRecord], now: int) -> None:
        """Points the wave's members that have not been told yet at the candidate, and tells them."""
        budget = self._allowed_now(ro, wave, now)
        local = windows.any_device_local(ro.settings.windows)
        todo: list[tuple[MemberRecord, DeviceRecord]] = []
        held: Counter[str] = Counter()  # time zone -> members whose own window is closed
        zone_open: dict[str, bool] = {}  # once per zone, not per device (75 us each: 10,000 devices)
        offline = 0
        for m in _canary(ro, wave.index):
            device = devices.get(m.device_id)
            if m.assigned_ms or device is None or device.revoked or not m.target_path:
                continue
            tz = device.capabilities.timezone
            if local and tz not in zone_open:
                zone_open[tz] = windows.open_now(ro.settings.windows, _utc(now), tz)
            if local and not zone_open[tz]:
                held[tz] += 1  # its own maintenance window is closed: it waits
            elif ro.settings.windows and not self.deployments.streams.is_connected(device.id):
                offline += 1  # told only while connected: else it installs on reconnect, window or not
            elif len(todo) < budget:  # (counted before the rate cap, so the count does not flap)
                todo.append((m, device))
        self._held[(ro.rollout.id, wave.index)] = sum(held.values())
        offline_text = (
            f"wave {wave.index}: {offline} offline devices are told when they connect inside a window"
        )
        await self._waiting(ro.rollout, "offline", offline_text if offline else "")
        await self._waiting(ro.rollout, "local", windows.local_waiting(wave.index, held) if held else "")
        if not todo:
            return
        models = {m.target_path: await self.deployments.repository.model(m.target_path) for m, _ in todo}
        dep_id = wave.deployment_id  # or, for a member retried by the operator, its retry-failed order

        # A device that already serves the candidate (it kept it after an earlier rollout) passed its
        # probation then: it counts as healthy at once, with nothing to install.
        there = {m.device_id for m, d in todo if not wave.shadow and d.current_target == m.target_path}

        def state(m: MemberRecord) -> dict[str, Any]:
            if m.device_id in there:
                return {"assigned_ms": now, "state": "healthy", "healthy_ms": now, "updated_ms": now}
            return {"assigned_ms": now, "state": "pending"}

        def write() -> None:
            for m, device in todo:
                # Clears what it reported for an earlier order in the same write: a device that connects
                # meanwhile is told at once and may report on this order before the loop ends.
                order = m.retry_order or dep_id
                self.store.add_deployment_target(order, m.device_id, m.target_path)
                if m.device_id in there:  # unless a newer order took it meanwhile
                    self.store.record_stage(m.device_id, "healthy", "", device.last_seen_ms, deployment=order)
            self.rollouts.update_members(ro.rollout.id, [(m.device_id, m.role, state(m)) for m, _ in todo])

        await asyncio.to_thread(write)
        for m, _ in todo:
            m.assigned_ms, m.state = now, str(state(m)["state"])
            if m.device_id not in there:
                model, retry = models[m.target_path], bool(m.retry_order)
                push = AssignmentPush(model, m.retry_order or dep_id, wave.shadow, ro.rollout.id, retry)
                self.deployments.streams.push(m.device_id, push)

    async def _refresh_states(self, ro: Loaded, devices: dict[str, DeviceRecord]) -> None:
        """Each assigned member's state from what its device reported about this rollout's wave."""
        waves = {w.index: w for w in ro.waves}
        changes = []
        now = self.clock()
        for m in ro.members:
            device = devices.get(m.device_id)
            if m.role != "canary" or not m.assigned_ms or device is None:
                continue
            told = m.retry_order or waves[m.wave_index].deployment_id  # what the member was assigned under
            if device.desired_deployment != told or device.last_stage not in TRACKED:
                continue
            state = device.last_stage
            if state == "healthy" and device.current_target != m.target_path:
                continue  # healthy on something else (a rollback to it): not yet
            if m.state == "healthy" and state in ("downloading", "verified", "activated"):
                continue  # a late report of an earlier install step: healthy stays
            if state != m.state:
                values: dict[str, Any] = {"state": state, "updated_ms": now}
                if state in ("healthy", "shadow_ready"):
                    values["healthy_ms"] = now
                changes.append((m.device_id, m.role, values))
                m.state = state
        await asyncio.to_thread(self.rollouts.update_members, ro.rollout.id, changes)

    async def _judge(self, ro: Loaded, wave: WaveRecord, now: int) -> None:
        r = ro.rollout
        canary = list(_canary(ro, wave.index))
        control = [m for m in ro.members if m.role == "control" and m.wave_index == wave.index]
        last = wave.index == len(ro.waves) - 1
        gates = wave_gates(ro.settings.gates, shadow=wave.shadow, last=last, has_control=bool(control))
        if wave.state == "holding" and now - wave.judged_ms < _rejudge_ms(ro.settings.soak_s, self.tick_s):
            return  # judging a big wave reads every member's telemetry: not on every tick
        soaked = now - wave.started_ms >= ro.settings.soak_s * 1000
        done = sum(1 for m in canary if evaluate.succeeded(m, wave.shadow))
        need = min(ro.settings.min_devices, len(canary))
        ready = soaked and done >= need
        await self._waiting(
            r, "healthy", _short_of_healthy(r, wave, canary, need) if soaked and not ready else ""
        )
        # Installs are judged all along: a wave that breaks devices stops before its soak ends.
        gates = gates if ready else install_gate(gates)
        telemetry = {}
        if ready:
            ids = [m.device_id for m in canary + control]
            telemetry = await asyncio.to_thread(self.rollouts.telemetry_since, ids, wave.started_ms)
        judgement = evaluate.with_completion(
            evaluate.judge_wave(gates, canary, control, telemetry, wave.shadow),
            canary,
            wave.shadow,
            self._held.get((r.id, wave.index), 0),
        )
        if not ready and judgement.outcome is not Outcome.FAIL:
            return
        verdicts = json.loads(evaluate.judgement_json(judgement))
        outcome = judgement.outcome.value
        state = {"pass": "passed", "fail": "failed", "inconclusive": "holding"}[outcome]
        await asyncio.to_thread(
            self.rollouts.update_wave,
            r.id,
            wave.index,
            state=state,
            judged_ms=now,
            outcome=outcome,
            judgement_json=json.dumps(verdicts),
        )
        wave.state = state
        key = (r.id, wave.index)
        if self._last_outcome.get(key) != outcome or outcome != "inconclusive":
            self._last_outcome[key] = outcome
            await self.recorder.record(
                ENGINE_ACTOR,
                "rollout.gate",
                r.id,
                {"wave": wave.index, "outcome": outcome, "verdicts": verdicts},
            )
            await self.note(r, f"wave {wave.index}: {outcome}", {"wave": wave.index, "verdicts": verdicts})
        if judgement.outcome is Outcome.PASS:
            await self.advance(ro, wave, now)
        elif judgement.outcome is Outcome.FAIL:
            reason = f"wave {wave.index} failed: {evaluate.failed_line(judgement)}"
            await self.abort(ro, ENGINE_ACTOR, reason, rollback=True)

    async def advance(self, ro: Loaded, wave: WaveRecord, now: int) -> None:
        """The next wave, or the rollout is complete."""
        r = ro.rollout
        if wave.index + 1 < len(ro.waves):
            await asyncio.to_thread(
                self.rollouts.update_rollout, r.id, current_wave=wave.index + 1, updated_ms=now
            )
            r.current_wave = wave.index + 1
        else:
            await asyncio.to_thread(
                self.rollouts.update_rollout, r.id, state="completed", finished_ms=now, updated_ms=now
            )
            r.state = "completed"
            await self.note(r, "completed", {})
            await self.recorder.record(ENGINE_ACTOR, "rollout.complete", r.id, {"waves": len(ro.waves)})

    async def abort(self, ro: Loaded, actor: str, reason: str, *, rollback: bool) -> str:
        """Stops the rollout; with `rollback`, every device on the candidate is ordered back to its previous
        model (the rollback order names the rollout: devices accept it on the operator's rollout permit),
        and devices still installing are pointed back at what they run. Returns the rollback order's id."""
        r = ro.rollout
        now = self.clock()
        devices = {d.id: d for d in await asyncio.to_thread(self.store.list_devices)}
        rollback_id = f"{r.id}-rb" if rollback else ""
        sent = await send_back.order_back(self, ro, devices, rollback_id, reason)

        def write() -> None:
            self.rollouts.update_wave(
                r.id, r.current_wave, state="failed" if actor == ENGINE_ACTOR else "aborted"
            )
            self.rollouts.update_rollout(
                r.id,
                state="aborted",
                reason=reason[:4000],
                finished_ms=now,
                updated_ms=now,
                rollback_id=rollback_id,
            )

        await asyncio.to_thread(write)
        r.state, r.reason, r.finished_ms, r.rollback_id = "aborted", reason, now, rollback_id
        details = {
            "reason": reason,
            "rollback": rollback,
            "rolled_back_devices": sent.on_candidate,
            "stranded_devices": sent.stranded,
        }
        stranded = f"; {sent.stranded} devices have no earlier model to go back to" if sent.stranded else ""
        await self.note(r, "aborted: " + reason + stranded, details)
        await self.recorder.record(actor, "rollout.abort", r.id, details)
        return rollback_id

    async def _late_joiners(self, ro: Loaded, devices: dict[str, DeviceRecord]) -> None:
        """Devices that match the selector now but were not there at the start join the first wave that has
        not started (or the last one, which then assigns them at once)."""
        new = claims.newcomers(ro.rollout, ro.members, devices.values())
        if not new:
            return
        # Rare: read what else could claim them only then, under the lock a deploy checks and writes under.
        async with self.deployments.claiming:
            rollouts, orders = await asyncio.to_thread(self._orders)
            new = [d for d in new if claims.adopter(d, rollouts, orders) == ro.rollout.id]
            if not new:
                return
            variants = await self.deployments.repository.signed_variants(
                ro.rollout.model_name, ro.rollout.version
            )
            index = place_late_joiner([(w.index, w.state) for w in ro.waves])
            added = []
            for device in new:
                caps = _capabilities_dict(device.capabilities)
                chosen, _ = choose(variants, caps, list(device.bad_targets), "")
                if chosen is not None:
                    added.append(
                        MemberRecord(
                            ro.rollout.id, device.id, index, "canary", target_path=chosen.target_path
                        )
                    )
            if added:
                await asyncio.to_thread(self.rollouts.add_members, added)
        if added:
            ro.members.extend(added)
            await self.note(
                ro.rollout,
                f"{len(added)} late joiners joined wave {index}",
                {"devices": [m.device_id for m in added][:50]},
            )

    def _orders(self) -> tuple[list[RolloutRecord], list[Deployment]]:
        plain = (
            d for d in self.store.list_deployments() if d.kind not in (ROLLOUT_KIND, ROLLOUT_ROLLBACK_KIND)
        )
        return self.rollouts.list_rollouts(), list(plain)

    async def note(self, r: RolloutRecord, what: str, details: dict[str, Any]) -> None:
        entry = TimelineEntry(r.id, self.clock(), what[:2000], json.dumps(details, sort_keys=True))
        await asyncio.to_thread(self.rollouts.add_timeline, [entry])


def _rejudge_ms(soak_s: float, tick_s: float) -> float:
    """How long a holding wave waits before it is judged again: a tenth of its soak, within [tick, 60 s]."""
    return 1000 * max(tick_s, min(60.0, soak_s / 10))


def _short_of_healthy(r: RolloutRecord, wave: WaveRecord, canary: list[MemberRecord], need: int) -> str:
    """Why a soaked wave with fewer healthy devices than it `need`s is not judged, once none is still to
    install ("" while some are: they may yet make up the number)."""
    states = Counter(evaluate.install_state(m, wave.shadow) for m in canary)
    if states["pending"]:
        return ""
    return (
        f"wave {wave.index} soaked, but {states['succeeded']} of the {need} healthy devices it needs are"
        f" healthy and {states['failed']} failed: `edgefleet rollout retry-failed {r.id}` lets them try"
        f" again, `edgefleet rollout next {r.id}` promotes the wave, `edgefleet rollout abort {r.id}` ends it"
    )


def _utc(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc)


def _canary(ro: Loaded, index: int) -> list[MemberRecord]:
    return [m for m in ro.members if m.role == "canary" and m.wave_index == index]
