"""A rollout's plan, pure: how many devices each wave reaches, which devices those are, and each wave's
matched control cohort.

    parse_waves("5,10%,50%,100%") or parse_ramp("2,2,60")  ->  WaveSpec steps (cumulative over the target)
    wave_sizes(steps, target)                               ->  cumulative device counts per wave
    order_devices(rollout_id, candidates)                   ->  one stratified, deterministic order
    plan_waves(rollout_id, candidates, sizes)               ->  members and control per wave

The order interleaves the strata (runtime, chosen variant, hardware class, and labels once a device carries
them: `stratum_of` is the one key function) in proportion to their sizes, with a device's place inside its
stratum drawn from sha256(rollout id, device id). Every prefix of the order is then representative of the
target, so wave k takes the next slice of it. The control cohort of a wave is, stratum by stratum, as many
devices as the wave has there, taken from the devices later waves will reach (they stay on the incumbent
while the wave soaks). The last wave has no control: nothing is left on the incumbent to compare with.

The engine records the plan in the database when the rollout starts; nothing here is recomputed later.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from edgefleet.errors import InvalidRequestError

MAX_WAVES = 50


@dataclass(frozen=True)
class WaveSpec:
    """One step of the plan: a cumulative share of the target, as a device count or a percentage."""

    count: int = 0  # devices, cumulative; used when percent is 0
    percent: float = 0.0  # of the target, cumulative

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent else str(self.count)

    def devices(self, target: int) -> int:
        if self.percent:
            return min(target, math.ceil(target * self.percent / 100.0))
        return min(target, self.count)


@dataclass(frozen=True)
class Ramp:
    """AWS IoT Jobs' exponential rollout: `base` devices, each wave `factor` times the one before, and at
    most `max_per_minute` installs started per minute (the engine paces assignments to it)."""

    base: int
    factor: float
    max_per_minute: int

    def __str__(self) -> str:
        return f"{self.base},{self.factor:g},{self.max_per_minute}"


@dataclass(frozen=True)
class Candidate:
    """A device the rollout targets, with what its stratum is made of."""

    device_id: str
    runtime: str = ""
    variant: str = ""  # the variant the server chose for it
    hardware_class: str = ""
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class WavePlan:
    index: int
    shadow: bool
    size: int  # cumulative devices the rollout reaches once this wave is in
    members: tuple[str, ...]  # the devices this wave adds
    control: tuple[str, ...]  # devices that stay on the incumbent while it soaks


_COUNT = re.compile(r"^[0-9]{1,7}$")
_PERCENT = re.compile(r"^([0-9]{1,3}(?:\.[0-9]{1,3})?)%$")


def parse_waves(text: str) -> tuple[WaveSpec, ...]:
    """`5,10%,50%,100%`: counts or percentages, cumulative, non-decreasing. Raises InvalidRequestError."""
    parts = [p.strip() for p in (text or "").split(",")]
    if not parts or parts == [""]:
        raise InvalidRequestError("waves: give at least one wave, e.g. '5,10%,50%,100%'")
    if len(parts) > MAX_WAVES:
        raise InvalidRequestError(f"waves: at most {MAX_WAVES} waves, not {len(parts)}")
    steps: list[WaveSpec] = []
    for part in parts:
        if _COUNT.match(part) and int(part) > 0:
            steps.append(WaveSpec(count=int(part)))
        elif (m := _PERCENT.match(part)) and 0 < float(m.group(1)) <= 100:
            steps.append(WaveSpec(percent=float(m.group(1))))
        else:
            raise InvalidRequestError(
                f"waves: {part!r} is neither a device count (> 0) nor a percentage in (0, 100]; "
                "write e.g. '5,10%,50%,100%'"
            )
    for before, after in zip(steps, steps[1:], strict=False):
        if before.percent and after.percent and after.percent < before.percent:
            raise InvalidRequestError(f"waves are cumulative: {after} comes after {before}")
        if not before.percent and not after.percent and after.count < before.count:
            raise InvalidRequestError(f"waves are cumulative: {after} comes after {before}")
    return tuple(steps)


def parse_ramp(text: str) -> Ramp:
    """`BASE,FACTOR,MAX_PER_MINUTE`, e.g. `2,2,60`. Raises InvalidRequestError."""
    parts = [p.strip() for p in (text or "").split(",")]
    try:
        if len(parts) != 3:
            raise ValueError
        ramp = Ramp(int(parts[0]), float(parts[1]), int(parts[2]))
    except ValueError:
        raise InvalidRequestError(f"ramp {text!r}: write BASE,FACTOR,MAX_PER_MINUTE, e.g. '2,2,60'") from None
    if ramp.base < 1 or not 1.0 < ramp.factor <= 100.0 or ramp.max_per_minute < 1:
        raise InvalidRequestError(
            f"ramp {text!r}: BASE >= 1, 1 < FACTOR <= 100 and MAX_PER_MINUTE >= 1 are needed"
        )
    return ramp


def ramp_steps(ramp: Ramp, target: int) -> tuple[WaveSpec, ...]:
    """The waves of a ramp over `target` devices: base, base x factor, ... cumulative, ending at 100 %."""
    steps: list[WaveSpec] = []
    size = float(ramp.base)
    total = 0
    while total < target and len(steps) < MAX_WAVES - 1:
        total = min(target, total + math.ceil(size))
        steps.append(WaveSpec(count=total))
        size *= ramp.factor
    steps.append(WaveSpec(percent=100.0))
    return tuple(steps)


def wave_sizes(steps: Sequence[WaveSpec], target: int) -> tuple[int, ...]:
    """Cumulative devices per wave over `target`, never decreasing; waves that add nobody are dropped."""
    sizes: list[int] = []
    for step in steps:
        n = max(step.devices(target), sizes[-1] if sizes else 0)
        if not sizes or n > sizes[-1]:
            sizes.append(n)
    return tuple(sizes) or (0,)


def stratum_of(candidate: Candidate) -> tuple[str, ...]:
    """What makes two devices the same kind for a representative wave. Labels join the key when
    DeviceRecord carries them (this is the one place to change)."""
    return (
        candidate.runtime,
        candidate.variant,
        candidate.hardware_class,
        *(f"{k}={v}" for k, v in candidate.labels),
    )


def _draw(rollout_id: str, device_id: str) -> float:
    digest = hashlib.sha256(f"{rollout_id}\0{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def order_devices(rollout_id: str, candidates: Sequence[Candidate]) -> tuple[Candidate, ...]:
    """Every candidate once, strata interleaved in proportion (systematic sampling within each stratum,
    places drawn from the rollout id): the same input gives the same order."""
    strata: dict[tuple[str, ...], list[Candidate]] = {}
    for c in candidates:
        strata.setdefault(stratum_of(c), []).append(c)
    keyed: list[tuple[float, float, str, Candidate]] = []
    for key, members in strata.items():
        members.sort(key=lambda c: (_draw(rollout_id, c.device_id), c.device_id))
        offset = _draw(rollout_id, "\0".join(key))
        for rank, c in enumerate(members):
            # The stratum's k-th device sits at (k + offset) / size: each stratum spread evenly over [0, 1).
            keyed.append(((rank + offset) / len(members), _draw(rollout_id, c.device_id), c.device_id, c))
    keyed.sort(key=lambda item: item[:3])
    return tuple(item[3] for item in keyed)


def plan_waves(
    rollout_id: str,
    candidates: Sequence[Candidate],
    sizes: Sequence[int],
    shadow_waves: int = 0,
) -> tuple[WavePlan, ...]:
    """Members and control cohort of each wave (see the module docstring)."""
    order = order_devices(rollout_id, candidates)
    plans: list[WavePlan] = []
    start = 0
    for index, size in enumerate(sizes):
        members = order[start:size]
        later = order[size:]
        wanted: dict[tuple[str, ...], int] = {}
        for c in members:
            wanted[stratum_of(c)] = wanted.get(stratum_of(c), 0) + 1
        control: list[str] = []
        for c in later:
            key = stratum_of(c)
            if wanted.get(key, 0) > 0:
                control.append(c.device_id)
                wanted[key] -= 1
        plans.append(
            WavePlan(
                index=index,
                shadow=index < shadow_waves,
                size=size,
                members=tuple(c.device_id for c in members),
                control=tuple(control),
            )
        )
        start = size
    return tuple(plans)


def place_late_joiner(waves: Sequence[tuple[int, str]]) -> int:
    """The wave a device that matched the selector after the start joins: the first wave not started yet
    (`waves`: (index, state)), else the last one (it is then assigned at once). -1 when there is none."""
    for index, state in waves:
        if state == "pending":
            return index
    return waves[-1][0] if waves else -1
