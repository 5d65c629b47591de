"""The rollout gates: each a frozen config with defaults for a camera fleet, and `evaluate(canary, control)`.

Every gate has a threshold, a sample floor (calls, devices or device-hours on each side) and, where a
statistical test applies, a one-sided confidence level. Below the floor, or without data, a gate is
inconclusive, never pass. The regression gates (errors, latency, crashes, restarts) fail on significant
evidence of a regression beyond their tolerance and pass otherwise once the floors are met; the shadow gate
must prove its agreement (pass only when the lower bound clears the threshold, fail when the upper bound is
below it, inconclusive in between); the install and drift gates compare a measured figure with a threshold.

Defaults: confidence 0.99 for every test, so a clean wave judged by the four statistical regression gates
fails by chance at most ~4 % of the time (Bonferroni). Latency "no more than 20 % slower"; errors "no more
than 0.1 percentage points more"; crashes and unplanned worker restarts "no more often than the control";
drift PSI 0.25 (the "significant shift" band) or JS distance 0.1; shadow agreement 0.95; installs 5 % failed
and at least 3 failed devices (Azure Device Update's percentage-and-count rule: 1 failure of 2 is not 50 %
of a fleet).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from edgefleet.server.rollouts import statistics as st
from edgefleet.server.rollouts.cohorts import CohortTelemetry
from edgefleet.server.rollouts.verdicts import Evidence, Outcome, Verdict, WaveJudgement, combine, fmt


class Gate(Protocol):
    @property
    def name(self) -> str: ...

    def evaluate(self, canary: CohortTelemetry, control: CohortTelemetry) -> Verdict: ...


def _check_confidence(confidence: float) -> None:
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), not {confidence}")


def _too_few(canary: float, control: float, floor: float, devices: tuple[int, int], min_devices: int) -> str:
    """Why the floors are not met ('' when they are)."""
    if canary < floor or control < floor:
        return f"too few samples: {fmt(canary)} and {fmt(control)}, the floor is {fmt(floor)} per side"
    if devices[0] < min_devices or devices[1] < min_devices:
        return f"too few devices: {devices[0]} and {devices[1]}, the floor is {min_devices} per side"
    return ""


@dataclass(frozen=True)
class InstallFailureGate:
    """Fail when at least `min_failed_devices` failed AND they are >= `max_failed_percent` of the finished."""

    name: str = "install-failures"
    max_failed_percent: float = 5.0
    min_failed_devices: int = 3
    min_finished_devices: int = 10

    def evaluate(self, canary: CohortTelemetry, control: CohortTelemetry) -> Verdict:
        o = canary.installs
        percent = 100.0 * o.failed / o.finished if o.finished else math.nan
        state = f"{o.failed} failed of {o.finished} finished ({fmt(percent)} %), {o.pending} pending"
        if o.failed >= self.min_failed_devices and percent >= self.max_failed_percent:
            outcome, why = (
                Outcome.FAIL,
                f"{state}: over {fmt(self.max_failed_percent)} % and {self.min_failed_devices} devices",
            )
        elif o.finished < self.min_finished_devices:
            outcome, why = Outcome.INCONCLUSIVE, f"{state}: fewer than {self.min_finished_devices} finished"
        else:
            outcome, why = (
                Outcome.PASS,
                f"{state}: within {fmt(self.max_failed_percent)} % or {self.min_failed_devices} devices",
            )
        evidence = Evidence(
            canary_n=o.finished,
            control_n=0,
            sample_unit="devices",
            statistic="failed_percent_of_finished",
            value=percent,
            threshold=self.max_failed_percent,
            explanation=why,
            figures=(("failed", o.failed), ("succeeded", o.succeeded), ("pending", o.pending)),
        )
        return Verdict(self.name, outcome, evidence)


@dataclass(frozen=True)
class ErrorRateGate:
    """Fail when Newcombe's lower bound of (canary - control) error rate exceeds `max_increase_points`."""

    name: str = "error-rate"
    max_increase_points: float = 0.1  # percentage points
    confidence: float = 0.99
    min_calls: int = 2000
    min_devices: int = 5

    def __post_init__(self) -> None:
        _check_confidence(self.confidence)

    def evaluate(self, canary: CohortTelemetry, control: CohortTelemetry) -> Verdict:
        n1, n2 = canary.inference_count, control.inference_count
        p1 = 100.0 * canary.error_count / n1 if n1 else math.nan
        p2 = 100.0 * control.error_count / n2 if n2 else math.nan
        short = _too_few(n1, n2, self.min_calls, (canary.devices, control.devices), self.min_devices)
        bound = None
        if short:
            outcome, why = Outcome.INCONCLUSIVE, short
        else:
            bound = 100.0 * st.rate_increase_lower_bound(
                canary.error_count, n1, control.error_count, n2, self.confidence
            )
            rates = f"errors {fmt(p1)} % vs control {fmt(p2)} %, increase >= {fmt(bound)} points"
            if bound > self.max_increase_points:
                outcome, why = Outcome.FAIL, f"{rates} (> {fmt(self.max_increase_points)})"
            else:
                outcome, why = (
                    Outcome.PASS,
                    f"{rates}: not shown above {fmt(self.max_increase_points)} points",
                )
        evidence = Evidence(
            canary_n=n1,
            control_n=n2,
            sample_unit="calls",
            statistic="error_rate_increase_points",
            value=p1 - p2,
            threshold=self.max_increase_points,
            explanation=why,
            bound=bound,
            confidence=self.confidence,
            figures=(("canary_error_percent", p1), ("control_error_percent", p2)),
        )
        return Verdict(self.name, outcome, evidence)


@dataclass(frozen=True)
class LatencyGate:
    """Fail when the canary is significantly more than `max_slowdown_percent` slower than the control.

    Two one-sided tests, each at (1 - confidence) / 2 so together they false-alarm at most 1 - confidence:
    the rank test of the canary against the control scaled by (1 + T) (the body: p50 and around), and the
    tail: the canary's share of calls above (1 + T) x the control's p95 against the control's 5 % above its
    p95 (Newcombe bound > 0). With `source="shadow"` the canary is the shadow candidate's latency on the
    canary's own devices and the control is the same devices' serving model (the control cohort is unused).
    """

    name: str = "latency"
    max_slowdown_percent: float = 20.0
    confidence: float = 0.99
    min_calls: int = 1000
    min_devices: int = 5
    source: Literal["serving", "shadow"] = "serving"

    def __post_init__(self) -> None:
        _check_confidence(self.confidence)
        if self.max_slowdown_percent < 0:
            raise ValueError("max_slowdown_percent cannot be negative")

    def evaluate(self, canary: CohortTelemetry, control: CohortTelemetry) -> Verdict:
        if self.source == "shadow":
            shadow = canary.shadow
            slow = shadow.candidate_latency_counts if shadow else ()
            base, devices = canary.latency_counts, (canary.devices, canary.devices)
        else:
            slow, base, devices = (
                canary.latency_counts,
                control.latency_counts,
                (canary.devices, control.devices),
            )
        bounds = canary.latency_bounds_ms
        n1, n2 = float(sum(slow)), float(sum(base))
        factor = 1.0 + self.max_slowdown_percent / 100.0
        statistic = f"mann_whitney_effect_vs_control_x{factor:g}"
        short = _too_few(n1, n2, self.min_calls, devices, self.min_devices)
        if not short and (len(slow) != len(bounds) + 1 or len(base) != len(bounds) + 1):
            short = "latency histograms do not match the bounds"
        if short:
            return Verdict(
                self.name,
                Outcome.INCONCLUSIVE,
                Evidence(
                    n1,
                    n2,
                    "calls",
                    statistic,
                    None,
                    self.max_slowdown_percent,
                    short,
                    confidence=self.confidence,
                ),
            )
        each = 1.0 - (1.0 - self.confidence) / 2.0
        rank = st.mann_whitney_greater(slow, st.scale_histogram(base, bounds, factor))
        p50 = (st.histogram_quantile(slow, bounds, 0.5), st.histogram_quantile(base, bounds, 0.5))
        p95 = (st.histogram_quantile(slow, bounds, 0.95), st.histogram_quantile(base, bounds, 0.95))
        tail_limit = factor * p95[1]
        tail_bound = math.nan
        if tail_limit < bounds[-1]:  # beyond the last finite bound nothing can be interpolated
            tail_bound = st.rate_increase_lower_bound(
                st.exceedance(slow, bounds, tail_limit), n1, st.exceedance(base, bounds, p95[1]), n2, each
            )
        body_fails = rank.p_value < 1.0 - each
        tail_fails = tail_bound > 0.0
        figures = (
            ("canary_p50_ms", p50[0]),
            ("control_p50_ms", p50[1]),
            ("canary_p95_ms", p95[0]),
            ("control_p95_ms", p95[1]),
            ("p50_ratio", p50[0] / p50[1] if p50[1] else math.inf),
            ("p95_ratio", p95[0] / p95[1] if p95[1] else math.inf),
            ("u", rank.u),
            ("z", rank.z),
            ("tail_excess_lower_bound", tail_bound),
        )
        shape = (
            f"p50 {fmt(p50[0])} vs {fmt(p50[1])} ms, p95 {fmt(p95[0])} vs {fmt(p95[1])} ms; "
            f"P(slower than control x{factor:g}) = {fmt(rank.effect)}, p = {fmt(rank.p_value, 2)}"
        )
        if body_fails or tail_fails:
            part = "body and tail" if body_fails and tail_fails else "body" if body_fails else "p95 tail"
            outcome, why = (
                Outcome.FAIL,
                f"{shape}: {part} more than {fmt(self.max_slowdown_percent)} % slower",
            )
        else:
            outcome, why = Outcome.PASS, f"{shape}: not shown over {fmt(self.max_slowdown_percent)} % slower"
        evidence = Evidence(
            canary_n=n1,
            control_n=n2,
            sample_unit="calls",
            statistic=statistic,
            value=rank.effect,
            threshold=self.max_slowdown_percent,
            explanation=why,
            p_value=rank.p_value,
            bound=None if math.isnan(tail_bound) else tail_bound,
            confidence=self.confidence,
            figures=figures,
        )
        return Verdict(self.name, outcome, evidence)


@dataclass(frozen=True)
class EventRateGate:
    """Fail when `event` happens significantly more often per device-hour than `max_rate_ratio` x control.

    Count only unplanned worker restarts: the restart a hot swap does on purpose is not one.
    """

    name: str = "crash-rate"
    event: Literal["crashes", "worker_restarts"] = "crashes"
    max_rate_ratio: float = 1.0
    confidence: float = 0.99
    min_device_hours: float = 24.0
    min_devices: int = 5

    def __post_init__(self) -> None:
        _check_confidence(self.confidence)
        if self.max_rate_ratio <= 0:
            raise ValueError("max_rate_ratio must be positive")

    def evaluate(self, canary: CohortTelemetry, control: CohortTelemetry) -> Verdict:
        c1 = canary.crashes if self.event == "crashes" else canary.worker_restarts
        c2 = control.crashes if self.event == "crashes" else control.worker_restarts
        t1, t2 = canary.device_hours, control.device_hours
        statistic = f"{self.event}_rate_ratio"
        short = _too_few(t1, t2, self.min_device_hours, (canary.devices, control.devices), self.min_devices)
        if short:
            evidence = Evidence(t1, t2, "device-hours", statistic, None, self.max_rate_ratio, short)
            return Verdict(self.name, Outcome.INCONCLUSIVE, evidence)
        test = st.poisson_rate_greater(c1, t1, c2, t2, self.max_rate_ratio)
        rates = (
            f"{c1} {self.event} in {fmt(t1)} h vs {c2} in {fmt(t2)} h "
            f"(x{fmt(test.rate_ratio)}), p = {fmt(test.p_value, 2)}"
        )
        if test.p_value < 1.0 - self.confidence:
            outcome, why = Outcome.FAIL, f"{rates}: more often than x{fmt(self.max_rate_ratio)} the control"
        else:
            outcome, why = Outcome.PASS, f"{rates}: not shown above x{fmt(self.max_rate_ratio)} the control"
        evidence = Evidence(
            canary_n=t1,
            control_n=t2,
            sample_unit="device-hours",
            statistic=statistic,
            value=test.rate_ratio,
            threshold=self.max_rate_ratio,
            explanation=why,
            p_value=test.p_value,
            confidence=self.confidence,
            figures=(
                ("canary_per_device_hour", test.canary_rate),
                ("control_per_device_hour", test.control_rate),
            ),
        )
        return Verdict(self.name, outcome, evidence)


def _psi_band(psi: float) -> str:
    return "stable" if psi < 0.1 else "moderate shift" if psi <= 0.25 else "significant shift"


@dataclass(frozen=True)
class OutputDriftGate:
    """Fail when the canary's output distribution (top class or top score) drifts past the threshold.

    Inconclusive while the drift expected from sampling noise alone exceeds half the threshold.
    """

    name: str = "drift-top-class"
    output: Literal["top_class", "top_score"] = "top_class"
    metric: Literal["psi", "js"] = "psi"
    max_psi: float = 0.25
    max_js_distance: float = 0.1
    min_calls: int = 2000
    min_devices: int = 5

    def evaluate(self, canary: CohortTelemetry, control: CohortTelemetry) -> Verdict:
        if self.output == "top_class":
            a, b = list(canary.top_class_counts), list(control.top_class_counts)
        else:
            a, b = list(canary.top_score_counts), list(control.top_score_counts)
        width = max(len(a), len(b))
        a, b = a + [0.0] * (width - len(a)), b + [0.0] * (width - len(b))  # classes one side never saw
        n1, n2 = float(sum(a)), float(sum(b))
        threshold = self.max_psi if self.metric == "psi" else self.max_js_distance
        statistic = "population_stability_index" if self.metric == "psi" else "jensen_shannon_distance_bits"
        short = _too_few(n1, n2, self.min_calls, (canary.devices, control.devices), self.min_devices)
        if short:
            evidence = Evidence(n1, n2, "calls", statistic, None, threshold, f"{self.output}: {short}")
            return Verdict(self.name, Outcome.INCONCLUSIVE, evidence)
        psi = st.population_stability_index(a, b)
        js = st.jensen_shannon_distance(a, b)
        value = psi if self.metric == "psi" else js
        noise = st.expected_null_psi(a, b) if self.metric == "psi" else st.expected_null_js_distance(a, b)
        shape = f"{self.output} PSI {fmt(psi)} ({_psi_band(psi)}), JS {fmt(js)}"
        if value > threshold:
            outcome, why = Outcome.FAIL, f"{shape}: {self.metric} over {fmt(threshold)}"
        elif noise > threshold / 2.0:
            outcome, why = Outcome.INCONCLUSIVE, f"{shape}: noise alone gives ~{fmt(noise)}, too few calls"
        else:
            outcome, why = Outcome.PASS, f"{shape}: {self.metric} within {fmt(threshold)}"
        evidence = Evidence(
            canary_n=n1,
            control_n=n2,
            sample_unit="calls",
            statistic=statistic,
            value=value,
            threshold=threshold,
            explanation=why,
            figures=(
                ("psi", psi),
                ("js_distance", js),
                ("expected_from_noise", noise),
                ("bins", float(width)),
            ),
        )
        return Verdict(self.name, outcome, evidence)


@dataclass(frozen=True)
class ShadowAgreementGate:
    """Pass when top-1 agreement's Wilson lower bound is >= `min_agreement`; fail when the upper is below."""

    name: str = "shadow-agreement"
    min_agreement: float = 0.95
    confidence: float = 0.99
    min_compared_calls: int = 500
    min_devices: int = 5

    def __post_init__(self) -> None:
        _check_confidence(self.confidence)

    def evaluate(self, canary: CohortTelemetry, control: CohortTelemetry) -> Verdict:
        s = canary.shadow
        n = float(s.compared_calls) if s else 0.0
        rate = s.top1_agreed / n if s and n else math.nan
        statistic = "top1_agreement"
        if s is None or n < self.min_compared_calls or canary.devices < self.min_devices:
            why = (
                f"{fmt(n)} compared calls on {canary.devices} devices, "
                f"the floors are {self.min_compared_calls} and {self.min_devices}"
            )
            evidence = Evidence(n, 0, "compared calls", statistic, rate, self.min_agreement, why)
            return Verdict(self.name, Outcome.INCONCLUSIVE, evidence)
        bounds = st.wilson_bounds(s.top1_agreed, n, self.confidence)
        shape = f"agreement {fmt(rate, 4)} in [{fmt(bounds.lower, 4)}, {fmt(bounds.upper, 4)}]"
        if bounds.lower >= self.min_agreement:
            outcome, why, bound = Outcome.PASS, f"{shape}: at least {fmt(self.min_agreement)}", bounds.lower
        elif bounds.upper < self.min_agreement:
            outcome, why, bound = Outcome.FAIL, f"{shape}: below {fmt(self.min_agreement)}", bounds.upper
        else:
            outcome, why, bound = (
                Outcome.INCONCLUSIVE,
                f"{shape}: straddles {fmt(self.min_agreement)}",
                bounds.lower,
            )
        evidence = Evidence(
            canary_n=n,
            control_n=0,
            sample_unit="compared calls",
            statistic=statistic,
            value=rate,
            threshold=self.min_agreement,
            explanation=why,
            bound=bound,
            confidence=self.confidence,
            figures=(
                ("lower_bound", bounds.lower),
                ("upper_bound", bounds.upper),
                ("mean_abs_diff", s.mean_abs_diff),
            ),
        )
        return Verdict(self.name, outcome, evidence)


def default_gates(*, shadow: bool = False) -> tuple[Gate, ...]:
    """Every gate with camera-fleet defaults; a shadow wave adds the agreement and shadow-latency gates."""
    gates: list[Gate] = [
        InstallFailureGate(),
        ErrorRateGate(),
        LatencyGate(),
        EventRateGate(),
        EventRateGate(name="worker-restart-rate", event="worker_restarts"),
        OutputDriftGate(),
        OutputDriftGate(name="drift-top-score", output="top_score"),
    ]
    if shadow:
        gates += [ShadowAgreementGate(), LatencyGate(name="shadow-latency", source="shadow")]
    return tuple(gates)


def judge(gates: Sequence[Gate], canary: CohortTelemetry, control: CohortTelemetry) -> WaveJudgement:
    """Evaluate every gate; the wave fails if any fails, is inconclusive if any is (or none are given)."""
    return combine(tuple(gate.evaluate(canary, control) for gate in gates))
