"""A rollout's settings, pure: its soak time, sample floor, schedule, and the gates each wave is judged by.

Gates start from `gates.default_gates` (camera-fleet defaults) and every threshold is settable per rollout
as `GATE.FIELD=VALUE` (`latency.max_slowdown_percent=30`, `install-failures.min_failed_devices=5`,
`drift-top-class.metric=js`), plus `GATE.enabled=false` to drop one and `latency.tolerance=1.2` (a factor,
the issue's spelling of a 20 % band). A wave in shadow is judged on what a shadow wave can show: installs
(shadow_ready counts as succeeded), agreement and the candidate's latency on the same devices. A wave with
no control cohort (the last one: nobody is left on the incumbent) is judged on installs alone.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet.errors import InvalidRequestError
from edgefleet.server.rollouts.gates import Gate, InstallFailureGate, default_gates
from edgefleet.server.rollouts.windows import MaintenanceWindow

SHADOW_GATES = ("install-failures", "shadow-agreement", "shadow-latency")
# Off unless a rollout enables it: the agent runs a shadow candidate at a lower CPU priority on purpose (it
# must never slow the served path), so its latency there reads slower than it will serve. Latency is judged
# in the first serving wave, against its control cohort.
OFF_BY_DEFAULT = frozenset({"shadow-latency"})
MAX_OVERRIDES = 100


@dataclass(frozen=True)
class GateOverride:
    gate: str
    field: str
    value: str

    def __str__(self) -> str:
        return f"{self.gate}.{self.field}={self.value}"


def parse_override(text: str) -> GateOverride:
    """`GATE.FIELD=VALUE`. Raises InvalidRequestError (checked against the gates in `build_gates`)."""
    key, sep, value = (text or "").partition("=")
    gate, dot, name = key.strip().partition(".")
    if not sep or not dot or not gate or not name or not value.strip():
        raise InvalidRequestError(
            f"gate setting {text!r}: write GATE.FIELD=VALUE, e.g. latency.max_slowdown_percent=30"
        )
    return GateOverride(gate, name.strip(), value.strip())


def _converted(gate: Gate, name: str, raw: str) -> Any:
    current = getattr(gate, name)
    try:
        if isinstance(current, bool):
            if raw.lower() not in ("true", "false"):
                raise ValueError
            return raw.lower() == "true"
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        return raw
    except ValueError:
        raise InvalidRequestError(
            f"gate {gate.name}: {name}={raw!r} is not a {type(current).__name__}"
        ) from None


def _slowdown_percent(gate: str, tolerance: str) -> str:
    """`tolerance=1.2` (no more than 20 % slower) as the gate's max_slowdown_percent."""
    try:
        return str((float(tolerance) - 1.0) * 100.0)
    except ValueError:
        raise InvalidRequestError(
            f"gate {gate}: tolerance={tolerance!r} is not a number; write e.g. 1.2 (at most 20 % slower)"
        ) from None


def build_gates(overrides: Sequence[GateOverride], *, shadow: bool) -> tuple[Gate, ...]:
    """The gates of one wave with the rollout's settings applied. Raises InvalidRequestError for an unknown
    gate or field, or a value the gate refuses (a confidence of 1.5)."""
    gates = list(default_gates(shadow=True))
    names = {g.name for g in gates}
    disabled: set[str] = set(OFF_BY_DEFAULT)
    for o in overrides:
        if o.gate not in names:
            raise InvalidRequestError(f"no gate named {o.gate!r}; the gates are: {', '.join(sorted(names))}")
        if o.field == "enabled":
            if o.value.lower() not in ("true", "false"):
                raise InvalidRequestError(f"gate {o.gate}: enabled must be true or false")
            if o.value.lower() == "false":
                disabled.add(o.gate)
            else:
                disabled.discard(o.gate)
            continue
        for i, gate in enumerate(gates):
            if gate.name != o.gate:
                continue
            name, raw = o.field, o.value
            if name == "tolerance" and hasattr(gate, "max_slowdown_percent"):
                name, raw = "max_slowdown_percent", _slowdown_percent(gate.name, raw)
            fields = {f.name for f in dataclasses.fields(gate)} - {"name"}  # type: ignore[arg-type]
            if name not in fields:
                raise InvalidRequestError(
                    f"gate {o.gate} has no setting {o.field!r}; it has: {', '.join(sorted(fields))}"
                )
            try:
                gates[i] = dataclasses.replace(gate, **{name: _converted(gate, name, raw)})  # type: ignore[type-var]
            except (TypeError, ValueError) as e:
                raise InvalidRequestError(f"gate {o.gate}: {e}") from None
    wanted = SHADOW_GATES if shadow else tuple(g.name for g in default_gates(shadow=False))
    return tuple(g for g in gates if g.name in wanted and g.name not in disabled)


def wave_gates(
    overrides: Sequence[GateOverride], *, shadow: bool, last: bool, has_control: bool
) -> tuple[Gate, ...]:
    """The gates a wave is judged by. Only the last wave, which leaves nobody on the incumbent, is judged
    without a control; an earlier wave with none (no later device of its kind) keeps every gate, which with
    nothing to compare are inconclusive: it holds until an operator promotes it."""
    gates = build_gates(overrides, shadow=shadow)
    return without_control(gates) if last and not has_control else gates


def install_gate(gates: Sequence[Gate]) -> tuple[Gate, ...]:
    """The gates of a wave that is not judged on telemetry (yet): installs alone."""
    return tuple(g for g in gates if isinstance(g, InstallFailureGate))


def without_control(gates: Sequence[Gate]) -> tuple[Gate, ...]:
    """The gates of a wave with no control cohort: installs, and a shadow wave's own comparison (the
    candidate against the serving model on the same devices needs nobody left on the incumbent)."""
    return tuple(g for g in gates if g.name in SHADOW_GATES)


@dataclass(frozen=True)
class RolloutSettings:
    waves: str = ""  # "5,10%,100%" (or empty with a ramp)
    ramp: str = ""  # "BASE,FACTOR,MAX_PER_MINUTE"
    soak_s: float = 600.0
    min_devices: int = 5  # healthy canary devices a wave needs before it is judged
    shadow_waves: int = 0
    gates: tuple[GateOverride, ...] = ()
    windows: tuple[MaintenanceWindow, ...] = ()
    start_at_ms: int = 0  # 0 = now

    def __post_init__(self) -> None:
        if not 0 <= self.soak_s <= 30 * 86400:
            raise InvalidRequestError("soak must be between 0 s and 30 days")
        if not 0 <= self.min_devices <= 1_000_000:
            raise InvalidRequestError("min devices must be between 0 and 1,000,000")
        if not 0 <= self.shadow_waves <= 49:
            raise InvalidRequestError("shadow waves must be between 0 and 49")
        if len(self.gates) > MAX_OVERRIDES:
            raise InvalidRequestError(f"at most {MAX_OVERRIDES} gate settings")
        if bool(self.waves) == bool(self.ramp):
            raise InvalidRequestError("give either waves (e.g. 5,10%,100%) or a ramp (BASE,FACTOR,MAX)")
        build_gates(self.gates, shadow=False)  # refuses an unknown gate or value now

    def to_json(self) -> str:
        return json.dumps(
            {
                "waves": self.waves,
                "ramp": self.ramp,
                "soak_s": self.soak_s,
                "min_devices": self.min_devices,
                "shadow_waves": self.shadow_waves,
                "gates": [str(g) for g in self.gates],
                "windows": [
                    {"cron": w.cron, "duration_s": w.duration_s, "device_local": w.device_local}
                    for w in self.windows
                ],
                "start_at_ms": self.start_at_ms,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> RolloutSettings:
        data = json.loads(text)
        return cls(
            waves=str(data["waves"]),
            ramp=str(data["ramp"]),
            soak_s=float(data["soak_s"]),
            min_devices=int(data["min_devices"]),
            shadow_waves=int(data["shadow_waves"]),
            gates=tuple(parse_override(g) for g in data["gates"]),
            windows=tuple(
                MaintenanceWindow(w["cron"], float(w["duration_s"]), bool(w["device_local"]))
                for w in data["windows"]
            ),
            start_at_ms=int(data["start_at_ms"]),
        )
