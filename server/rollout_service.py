"""The rollout service: staged rollouts for the CLI. Each handler checks every field of the request, calls
`Fleet.rollouts` (server.rollouts.actions) with the caller's name for the audit log, and translates the
answer to protobuf; errors become status codes in `rpc_status.status_for_errors`. Operator certificates
only (`server.auth.build_policy`).
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from edgefleet import errors
from edgefleet.server.auth import Authenticator
from edgefleet.server.fleet import Fleet
from edgefleet.server.rollouts.actions import RolloutStatus, check_rollout_id
from edgefleet.server.rollouts.settings import RolloutSettings, parse_override
from edgefleet.server.rollouts.windows import MaintenanceWindow
from edgefleet.server.rpc_status import check_name, status_for_errors
from edgefleet.server.storage.rollout_records import RolloutRecord
from edgefleet.v1 import rollout_pb2, rollout_pb2_grpc

MAX_TEXT = 256
MAX_WINDOWS = 20
MAX_REASON = 500


def _text(what: str, value: str, limit: int = MAX_TEXT) -> str:
    if len(value) > limit:
        raise errors.InvalidRequestError(f"{what} is longer than {limit} characters")
    return value


def settings_from(request: rollout_pb2.StartRolloutRequest) -> RolloutSettings:
    """Raises InvalidRequestError for any field out of its range, saying which."""
    if not math.isfinite(request.soak_seconds):
        raise errors.InvalidRequestError("soak seconds must be a finite number")
    if len(request.windows) > MAX_WINDOWS:
        raise errors.InvalidRequestError(f"at most {MAX_WINDOWS} maintenance windows")
    if request.start_at_unix_ms < 0:
        raise errors.InvalidRequestError("start_at must be a time after 1970 (or 0 for now)")
    now = dt.datetime.now(dt.timezone.utc)
    windows = tuple(
        MaintenanceWindow(_text("window cron", w.cron, 100), w.duration_seconds, w.device_local).check_opens(
            now
        )
        for w in request.windows
    )
    return RolloutSettings(
        waves=_text("waves", request.waves),
        ramp=_text("ramp", request.ramp),
        soak_s=request.soak_seconds,
        min_devices=request.min_devices,
        shadow_waves=request.shadow_waves,
        gates=tuple(parse_override(_text("gate setting", g)) for g in request.gates),
        windows=windows,
        start_at_ms=request.start_at_unix_ms,
    )


def summary(r: RolloutRecord, waves: int) -> rollout_pb2.RolloutSummary:
    return rollout_pb2.RolloutSummary(
        id=r.id,
        name=r.name,
        model_name=r.model_name,
        version=r.version,
        selector=r.selector,
        state=r.state,
        current_wave=r.current_wave,
        waves=waves,
        created_at_unix_ms=r.created_ms,
        actor=r.actor,
        reason=r.reason,
        finished_at_unix_ms=r.finished_ms,
    )


def _gate(v: dict[str, Any]) -> rollout_pb2.GateResult:
    out = rollout_pb2.GateResult(
        gate=v["gate"],
        outcome=v["outcome"],
        statistic=v["statistic"],
        canary_n=v["canary_n"] or 0.0,
        control_n=v["control_n"] or 0.0,
        sample_unit=v["sample_unit"],
        explanation=v["explanation"],
    )
    for name in ("value", "threshold", "p_value", "bound"):
        if v.get(name) is not None:
            setattr(out, name, v[name])
    return out


def status_to_proto(s: RolloutStatus) -> rollout_pb2.GetRolloutResponse:
    return rollout_pb2.GetRolloutResponse(
        rollout=summary(s.rollout, len(s.waves)),
        waves=[
            rollout_pb2.WaveStatus(
                index=w.wave.index,
                shadow=w.wave.shadow,
                size=w.wave.size,
                state=w.wave.state,
                started_at_unix_ms=w.wave.started_ms,
                judged_at_unix_ms=w.wave.judged_ms,
                outcome=w.wave.outcome,
                device_states=w.counts,
                control_devices=w.control,
                gates=[_gate(v) for v in w.verdicts],
            )
            for w in s.waves
        ],
        timeline=[
            rollout_pb2.TimelineEntry(at_unix_ms=e.at_ms, what=e.what, details_json=e.details_json)
            for e in s.timeline
        ],
        settings_json=s.settings.to_json(),
    )


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, fleet: Fleet, auth: Authenticator):
        self.fleet = fleet
        self.auth = auth

    async def _actor(self, context: Any) -> str:
        return (await self.auth.principal(context)).id

    async def StartRollout(self, request: Any, context: Any) -> Any:
        actor = await self._actor(context)
        async with status_for_errors(context):
            check_rollout_id(request.rollout_id)
            check_name("model name", request.model_name)
            check_name("version", request.version)
            name = _text("name", request.name) or request.rollout_id
            plan = await self.fleet.rollouts.start(
                actor,
                request.rollout_id,
                name,
                request.model_name,
                request.version,
                _text("selector", request.selector),
                settings_from(request),
                validate_only=request.validate_only,
            )
            return rollout_pb2.StartRolloutResponse(
                rollout_id=plan.rollout_id,
                selector=plan.selector,
                target=plan.target,
                waves=[
                    rollout_pb2.PlannedWave(
                        index=w.index, shadow=w.shadow, size=w.size, members=w.members, control=w.control
                    )
                    for w in plan.waves
                ],
                unassigned=plan.unassigned[:100],
                started=not request.validate_only,
            )

    async def ListRollouts(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            rollouts = await self.fleet.rollouts.list()
            return rollout_pb2.ListRolloutsResponse(rollouts=[summary(r, waves) for r, waves in rollouts])

    async def GetRollout(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            return status_to_proto(await self.fleet.rollouts.status(check_rollout_id(request.rollout_id)))

    async def PauseRollout(self, request: Any, context: Any) -> Any:
        actor = await self._actor(context)
        async with status_for_errors(context):
            await self.fleet.rollouts.pause(actor, check_rollout_id(request.rollout_id))
            return rollout_pb2.PauseRolloutResponse()

    async def ResumeRollout(self, request: Any, context: Any) -> Any:
        actor = await self._actor(context)
        async with status_for_errors(context):
            await self.fleet.rollouts.resume(actor, check_rollout_id(request.rollout_id))
            return rollout_pb2.ResumeRolloutResponse()

    async def NextWave(self, request: Any, context: Any) -> Any:
        actor = await self._actor(context)
        async with status_for_errors(context):
            current = await self.fleet.rollouts.next_wave(actor, check_rollout_id(request.rollout_id))
            return rollout_pb2.NextWaveResponse(current_wave=current)

    async def AbortRollout(self, request: Any, context: Any) -> Any:
        actor = await self._actor(context)
        async with status_for_errors(context):
            rollback_id = await self.fleet.rollouts.abort(
                actor,
                check_rollout_id(request.rollout_id),
                _text("reason", request.reason, MAX_REASON),
                no_rollback=request.no_rollback,
            )
            return rollout_pb2.AbortRolloutResponse(rollback_command_id=rollback_id)

    async def RetryFailed(self, request: Any, context: Any) -> Any:
        actor = await self._actor(context)
        async with status_for_errors(context):
            count = await self.fleet.rollouts.retry_failed(actor, check_rollout_id(request.rollout_id))
            return rollout_pb2.RetryFailedResponse(devices=count)
