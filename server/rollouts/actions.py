"""What an operator does to a staged rollout: start it (or only plan it), pause, resume, promote the current
wave now, abort (with or without rollback), retry the failed devices; and what a status shows.

Each action runs under the engine's lock, writes the database first, then goes to the audit hook with the
operator's name (`Principal.id`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from edgefleet import signing
from edgefleet.errors import ConflictError, InvalidRequestError, NotFoundError
from edgefleet.selectors import parse_selector
from edgefleet.server.deployments import _capabilities_dict, resolve_selector
from edgefleet.server.rollouts import claims, orders, plan
from edgefleet.server.rollouts.engine import Loaded, RolloutEngine
from edgefleet.server.rollouts.settings import RolloutSettings
from edgefleet.server.storage.rollout_records import (
    MEMBER_STATES,
    MemberRecord,
    RolloutRecord,
    TimelineEntry,
    WaveRecord,
)
from edgefleet.server.variants import choose

ROLLOUT_ID = re.compile(r"^ro-[a-z0-9]{4,32}$")


def check_rollout_id(rollout_id: str) -> str:
    if not ROLLOUT_ID.match(rollout_id or ""):
        raise InvalidRequestError(
            f"rollout id {rollout_id!r}: use 'ro-' and 4-32 lowercase letters or digits (the CLI proposes one)"
        )
    return rollout_id


@dataclass
class PlannedWave:
    index: int
    shadow: bool
    size: int
    members: tuple[str, ...]
    control: tuple[str, ...]


@dataclass
class Plan:
    rollout_id: str
    selector: str
    target: int
    waves: list[PlannedWave]
    unassigned: list[str] = field(default_factory=list)


@dataclass
class WaveStatus:
    wave: WaveRecord
    counts: dict[str, int]
    control: int
    verdicts: list[dict[str, Any]]


@dataclass
class RolloutStatus:
    rollout: RolloutRecord
    settings: RolloutSettings
    waves: list[WaveStatus]
    timeline: list[TimelineEntry]


class RolloutActions:
    def __init__(self, engine: RolloutEngine):
        self.engine = engine
        self.rollouts = engine.rollouts

    async def start(
        self,
        actor: str,
        rollout_id: str,
        name: str,
        model_name: str,
        version: str,
        selector_text: str,
        settings: RolloutSettings,
        *,
        validate_only: bool = False,
    ) -> Plan:
        """Plans the rollout over the devices `selector_text` names now and, unless `validate_only`, records
        it; the engine's loop runs it. Raises InvalidRequestError, NotFoundError (model, version) and
        ConflictError (a duplicate id, or no device to roll out to)."""
        check_rollout_id(rollout_id)
        e = self.engine
        selector = await resolve_selector(e.store, parse_selector(selector_text))
        variants = await e.deployments.repository.signed_variants(model_name, version)
        devices = await asyncio.to_thread(e.store.devices_matching, selector)
        candidates: list[plan.Candidate] = []
        targets: dict[str, str] = {}
        unassigned: list[str] = []
        for d in devices:
            if d.revoked:
                continue
            chosen, why = choose(variants, _capabilities_dict(d.capabilities), list(d.bad_targets), "")
            if chosen is None:
                unassigned.append(f"{d.name} ({d.id}): {why}")
                continue
            targets[d.id] = chosen.target_path
            caps = d.capabilities
            candidates.append(plan.Candidate(d.id, caps.runtime, chosen.variant, caps.hardware_class))
        if not candidates:
            raise ConflictError(f"{selector} reaches no device that can run {model_name} {version}")
        names = {d.id: d.name for d in devices}

        def refuse_if_claimed() -> None:  # blocking: run in a thread
            claims.refuse_claimed(claims.claimed(e.rollouts, targets), names, f"rollout {rollout_id}")

        await asyncio.to_thread(refuse_if_claimed)  # in the plan too: the CLI plans before it signs
        if settings.ramp:
            steps = plan.ramp_steps(plan.parse_ramp(settings.ramp), len(candidates))
        else:
            steps = plan.parse_waves(settings.waves)
        sizes = plan.wave_sizes(steps, len(candidates))
        if settings.shadow_waves >= len(sizes):
            raise InvalidRequestError(
                f"{settings.shadow_waves} shadow waves leave none of the {len(sizes)} waves over"
                f" {len(candidates)} devices to serve {model_name} {version}: give fewer shadow waves"
            )
        waves = plan.plan_waves(rollout_id, candidates, sizes, settings.shadow_waves)
        result = Plan(
            rollout_id,
            str(selector),
            len(candidates),
            [PlannedWave(w.index, w.shadow, w.size, w.members, w.control) for w in waves],
            unassigned,
        )
        if validate_only:
            return result
        await self._check_permit(rollout_id, model_name, version)
        now = e.clock()
        record = RolloutRecord(
            rollout_id,
            name,
            model_name,
            version,
            str(selector),
            now,
            actor,
            settings.to_json(),
            updated_ms=now,
        )
        wave_records = [WaveRecord(rollout_id, w.index, w.shadow, w.size) for w in waves]
        members = [
            MemberRecord(rollout_id, d, w.index, "canary", target_path=targets[d])
            for w in waves
            for d in w.members
        ]
        members += [MemberRecord(rollout_id, d, w.index, "control") for w in waves for d in w.control]
        # Again under the locks: another start may have claimed them since the plan, and a deploy that
        # checked its devices before this start must write before it.
        async with e.lock, e.deployments.claiming:
            await asyncio.to_thread(refuse_if_claimed)
            await asyncio.to_thread(self.rollouts.add_rollout, record, wave_records, members)
            details = {
                "model": model_name,
                "version": version,
                "selector": str(selector),
                "waves": [w.size for w in waves],
                "shadow_waves": settings.shadow_waves,
                "settings": json.loads(settings.to_json()),
            }
            await e.note(record, f"started by {actor}", details)
            await e.recorder.record(actor, "rollout.start", rollout_id, details)
        return result

    async def _check_permit(self, rollout_id: str, model_name: str, version: str) -> None:
        """A rollout starts only once the operator's signed permit for it is published: without it an abort
        could not send devices back (the server alone may not)."""
        try:
            current = await self.engine.deployments.repository.current_metadata("targets")
        except NotFoundError:
            current = b""
        permit = None
        if current:
            targets = signing.parse_metadata(current, "targets").signed
            permit = signing.rollout_permits(targets).get(rollout_id)
        sequence = signing.model_sequences(current or None).get((model_name, version))
        if permit is None or permit.model != model_name or permit.candidate_sequence != sequence:
            raise ConflictError(
                f"no rollout permit for {rollout_id} ({model_name} {version}) in the signed targets; "
                "`edgefleet rollout start` signs and publishes it before it starts the rollout"
            )

    async def _loaded(self, rollout_id: str, *states: str) -> Loaded:
        ro = await self.engine.load(check_rollout_id(rollout_id))
        if states and ro.rollout.state not in states:
            raise ConflictError(
                f"rollout {rollout_id} is {ro.rollout.state}; this needs it {' or '.join(states)}"
            )
        return ro

    async def _set_state(
        self, actor: str, rollout_id: str, action: str, state: str, *needs: str, why: str = ""
    ) -> None:
        async with self.engine.lock:
            ro = await self._loaded(rollout_id, *needs)
            await asyncio.to_thread(
                self.rollouts.update_rollout, rollout_id, state=state, updated_ms=self.engine.clock()
            )
            await self.engine.note(ro.rollout, f"{action} by {actor}" + (f": {why}" if why else ""), {})
            await self.engine.recorder.record(actor, f"rollout.{action}", rollout_id, {"state": state})

    async def hold_for_rollback(self, actor: str, device_ids: list[str], order_id: str) -> list[str]:
        """Pauses every running rollout that steers one of the devices an operator just sent back, so that
        its later waves do not undo the rollback; returns their ids."""
        busy = await asyncio.to_thread(claims.claimed, self.rollouts, device_ids)
        paused = []
        for rollout_id in sorted(set(busy.values())):
            why = f"rollback {order_id} sent some of its devices back"
            with contextlib.suppress(ConflictError):  # paused already
                await self._set_state(actor, rollout_id, "pause", "paused", "running", why=why)
                paused.append(rollout_id)
        return paused

    async def pause(self, actor: str, rollout_id: str) -> None:
        await self._set_state(actor, rollout_id, "pause", "paused", "running")

    async def resume(self, actor: str, rollout_id: str) -> None:
        await self._set_state(actor, rollout_id, "resume", "running", "paused")

    async def next_wave(self, actor: str, rollout_id: str) -> int:
        """Promotes the current wave now, whatever its gates say; returns the wave that comes next."""
        async with self.engine.lock:
            ro = await self._loaded(rollout_id, "running", "paused")
            wave = ro.waves[ro.rollout.current_wave]
            if wave.state == "pending":
                raise ConflictError(f"wave {wave.index} of {rollout_id} has not started; nothing to promote")
            now = self.engine.clock()
            await asyncio.to_thread(self.rollouts.update_wave, rollout_id, wave.index, state="promoted")
            await self.engine.note(ro.rollout, f"wave {wave.index} promoted by {actor}", {})
            await self.engine.recorder.record(actor, "rollout.next", rollout_id, {"wave": wave.index})
            await self.engine.advance(ro, wave, now)
            return ro.rollout.current_wave

    async def abort(self, actor: str, rollout_id: str, reason: str, *, no_rollback: bool) -> str:
        async with self.engine.lock:
            ro = await self._loaded(rollout_id, "running", "paused", "completed")
            why = reason or f"aborted by {actor}"
            return await self.engine.abort(ro, actor, why, rollback=not no_rollback)

    async def retry_failed(self, actor: str, rollout_id: str) -> int:
        """The current wave's failed devices are assigned the candidate again, under a retry-failed order of
        their own (`orders.next_retry_order`, recorded as a deployment) that tells each device it may lift
        the candidate's bad mark once for it (`Assignment.retry`; the agent bounds the lifts per candidate).
        The engine's loop assigns them as it assigns a wave (maintenance windows and rate cap hold). Returns
        how many."""
        async with self.engine.lock:
            ro = await self._loaded(rollout_id, "running", "paused")
            r, index = ro.rollout, ro.rollout.current_wave
            wave = ro.waves[index]
            failed = [
                m
                for m in ro.members
                if m.role == "canary" and m.wave_index == index and m.state in ("failed", "rolled_back")
            ]
            order_id = ""
            if failed:
                e = self.engine
                order_id = orders.next_retry_order(wave.deployment_id, e.deployments.rollout_tags)
                order = orders.rollout_order(r, order_id, e.clock(), reason=f"retry-failed by {actor}")
                await asyncio.to_thread(e.store.add_deployment, order, {})
                e.tag(order_id, r.id, wave.shadow, retry=True)
            retried = {"state": "pending", "assigned_ms": 0, "retry_order": order_id}
            changes = [(m.device_id, m.role, retried) for m in failed]
            await asyncio.to_thread(self.rollouts.update_members, rollout_id, changes)
            if wave.state in ("holding", "failed"):
                await asyncio.to_thread(self.rollouts.update_wave, rollout_id, index, state="soaking")
            details = {"devices": len(failed), "wave": index, "order": order_id}
            await self.engine.note(r, f"{len(failed)} failed devices retried by {actor}", details)
            await self.engine.recorder.record(actor, "rollout.retry-failed", rollout_id, details)
            return len(failed)

    async def status(self, rollout_id: str) -> RolloutStatus:
        ro = await self._loaded(rollout_id)
        timeline = await asyncio.to_thread(self.rollouts.timeline, rollout_id)
        waves = []
        for w in ro.waves:
            counts = dict.fromkeys(MEMBER_STATES, 0)
            control = 0
            for m in ro.members:
                if m.wave_index != w.index:
                    continue
                if m.role == "control":
                    control += 1
                else:
                    counts[m.state if m.state in counts else "pending"] += 1
            waves.append(WaveStatus(w, counts, control, json.loads(w.judgement_json or "[]")))
        return RolloutStatus(ro.rollout, ro.settings, waves, timeline)

    async def list(self) -> list[tuple[RolloutRecord, int]]:
        """Every rollout, oldest first, with its number of waves."""

        def read() -> list[tuple[RolloutRecord, int]]:
            return [(r, len(self.rollouts.waves(r.id))) for r in self.rollouts.list_rollouts()]

        return await asyncio.to_thread(read)
