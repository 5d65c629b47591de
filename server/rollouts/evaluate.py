"""Judging one wave, pure: its members and their telemetry -> columns -> the canary and control cohorts ->
`gates.judge`. Also the judgement as JSON (what the database, the status RPC and the audit log keep).

A canary device succeeded only when it reported `healthy` on the candidate after its probation (in a shadow
wave: `shadow_ready`); `failed` or `rolled_back` (the agent gave the candidate up) is a failed install.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgefleet.server.rollouts.cohorts import DeviceWindow, FleetColumns, InstallState, aggregate
from edgefleet.server.rollouts.gates import Gate, judge
from edgefleet.server.rollouts.samples import device_window
from edgefleet.server.rollouts.verdicts import Evidence, Outcome, Verdict, WaveJudgement, combine
from edgefleet.server.storage.rollout_records import MemberRecord
from edgefleet.values import TelemetryReport

FAILED_STATES = ("failed", "rolled_back")


def install_state(member: MemberRecord, shadow: bool) -> InstallState:
    if member.state in FAILED_STATES:
        return "failed"
    if member.state == ("shadow_ready" if shadow else "healthy"):
        return "succeeded"
    return "pending"


def succeeded(member: MemberRecord, shadow: bool) -> bool:
    return install_state(member, shadow) == "succeeded"


def wave_windows(
    canary: Sequence[MemberRecord],
    control: Sequence[MemberRecord],
    telemetry: Mapping[str, Sequence[TelemetryReport]],
    shadow: bool,
) -> list[DeviceWindow]:
    """The canary's windows first, then the control's, in the order given."""
    windows = []
    for m in canary:
        reports = telemetry.get(m.device_id, ())
        target = m.target_path
        if shadow:
            windows.append(
                device_window(
                    m.device_id,
                    reports,
                    counts=lambda s: False,
                    install=install_state(m, True),
                    shadow_of=target,
                )
            )
        else:
            windows.append(
                device_window(
                    m.device_id,
                    reports,
                    counts=lambda s, target=target: s.target_path == target,  # type: ignore[misc]
                    install=install_state(m, False),
                )
            )
    candidates = {m.target_path for m in canary if m.target_path}
    for m in control:
        windows.append(
            device_window(
                m.device_id,
                telemetry.get(m.device_id, ()),
                counts=lambda s: s.target_path not in candidates,
            )
        )
    return windows


def judge_wave(
    gates: Sequence[Gate],
    canary: Sequence[MemberRecord],
    control: Sequence[MemberRecord],
    telemetry: Mapping[str, Sequence[TelemetryReport]],
    shadow: bool,
) -> WaveJudgement:
    columns = FleetColumns.from_windows(wave_windows(canary, control, telemetry, shadow))
    rows = np.arange(len(columns))
    return judge(gates, aggregate(columns, rows[: len(canary)]), aggregate(columns, rows[len(canary) :]))


def completion_verdict(canary: Sequence[MemberRecord], shadow: bool, held: int = 0) -> Verdict:
    """A wave passes only once every one of its devices has finished (healthy, or failed and counted by the
    install gate): a device still installing, offline, or outside its maintenance window (`held` of them,
    never sent the candidate) holds the wave (the operator can promote it with `rollout next`)."""
    pending = sum(1 for m in canary if install_state(m, shadow) == "pending")
    outcome = Outcome.INCONCLUSIVE if pending else Outcome.PASS
    why = f"{pending} of {len(canary)} devices have not finished" if pending else "every device finished"
    if pending and held:
        why += f" ({held} wait for their maintenance window)"
    evidence = Evidence(
        float(len(canary) - pending), 0.0, "devices", "devices_pending", float(pending), 0.0, why
    )
    return Verdict("installs-finished", outcome, evidence)


def with_completion(
    judgement: WaveJudgement, canary: Sequence[MemberRecord], shadow: bool, held: int = 0
) -> WaveJudgement:
    return combine((*judgement.verdicts, completion_verdict(canary, shadow, held)))


def _number(value: float | None) -> float | None:
    if value is None or math.isnan(value):
        return None
    if math.isinf(value):
        return math.copysign(1e308, value)
    return float(value)


def verdict_json(v: Verdict) -> dict[str, Any]:
    e = v.evidence
    return {
        "gate": v.gate,
        "outcome": v.outcome.value,
        "statistic": e.statistic,
        "value": _number(e.value),
        "threshold": _number(e.threshold),
        "canary_n": _number(e.canary_n),
        "control_n": _number(e.control_n),
        "sample_unit": e.sample_unit,
        "p_value": _number(e.p_value),
        "bound": _number(e.bound),
        "confidence": _number(e.confidence),
        "explanation": e.explanation,
        "figures": {k: _number(x) for k, x in e.figures},
    }


def judgement_json(j: WaveJudgement) -> str:
    return json.dumps([verdict_json(v) for v in j.verdicts], sort_keys=True)


def failed_line(j: WaveJudgement) -> str:
    """The failed gates with their numbers, one line each (what the operator reads when a rollout stops)."""
    return "; ".join(v.line() for v in j.verdicts if v.outcome is Outcome.FAIL)
