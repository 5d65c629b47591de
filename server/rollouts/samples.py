"""Gate samples from stored telemetry, pure: one device's reports over a wave's window -> a `DeviceWindow`.

Each report carries per-version InferenceStats over its interval (deltas, not running totals), so a
window is their sum. Which stats count depends on the device's part in the wave:

- canary of a serving wave: the stats of the candidate target it was given;
- control: the stats of any other target (what it serves: the incumbent);
- canary of a shadow wave: the stats of the serving model that carry shadow stats for the candidate (the
  serving side is the baseline of the shadow latency gate, the shadow side the agreement).

Device-hours are the span the counted reports cover (n reports over a span s: s x n / (n - 1)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from edgefleet.server.rollouts.cohorts import LATENCY_BUCKETS, DeviceWindow, InstallState, ShadowAgreement
from edgefleet.values import LATENCY_BOUNDS_MS, InferenceStats, TelemetryReport

HOUR_MS = 3_600_000.0


def _add(total: list[int], more: Sequence[int]) -> list[int]:
    if len(more) > len(total):
        total = total + [0] * (len(more) - len(total))
    for i, v in enumerate(more):
        total[i] += v
    return total


def device_window(
    device_id: str,
    reports: Sequence[TelemetryReport],
    *,
    counts: Callable[[InferenceStats], bool],
    install: InstallState = "none",
    shadow_of: str = "",
) -> DeviceWindow:
    """Sums the stats `counts` selects. With `shadow_of` (a candidate target), only serving stats that
    carry shadow stats for it count, and those shadow stats are summed too."""
    calls = errors = crashes = restarts = 0
    latency: list[int] = []
    top_class: list[int] = []
    top_score: list[int] = []
    compared = agreed = 0
    abs_diff = 0.0
    shadow_latency: list[int] = []
    seen: list[int] = []
    for report in reports:
        used = False
        for s in report.inference:
            if shadow_of:
                if s.shadow is None or s.shadow.candidate_target_path != shadow_of:
                    continue
                compared += s.shadow.compared_calls
                agreed += s.shadow.top1_agreed
                abs_diff += s.shadow.abs_diff_sum
                if len(s.shadow.candidate_latency_counts) == LATENCY_BUCKETS:
                    shadow_latency = _add(shadow_latency, s.shadow.candidate_latency_counts)
            elif not counts(s):
                continue
            used = True
            calls += s.count
            errors += s.errors
            crashes += s.worker_crashes
            restarts += s.worker_restarts
            if tuple(s.latency_bounds_ms) == LATENCY_BOUNDS_MS and len(s.latency_counts) == LATENCY_BUCKETS:
                latency = _add(latency, s.latency_counts)
            if s.outputs is not None:
                top_class = _add(top_class, s.outputs.top_class_counts)
                top_score = _add(top_score, s.outputs.top_score_counts)
        if used:
            seen.append(report.at_ms)
    hours = 0.0
    if len(seen) >= 2:
        span = max(seen) - min(seen)
        hours = span * len(seen) / (len(seen) - 1) / HOUR_MS
    shadow = None
    if shadow_of and compared:
        shadow = ShadowAgreement(
            compared_calls=compared,
            top1_agreed=agreed,
            mean_abs_diff=abs_diff / compared,
            candidate_latency_counts=tuple(float(v) for v in shadow_latency),
        )
    return DeviceWindow(
        device_id=device_id,
        inference_count=calls,
        error_count=errors,
        latency_counts=tuple(latency) if latency else (),
        device_hours=hours,
        crashes=crashes,
        worker_restarts=restarts,
        top_class_counts=tuple(top_class),
        top_score_counts=tuple(top_score),
        shadow=shadow,
        install=install,
    )
