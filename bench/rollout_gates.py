"""How long does judging one rollout wave take over a simulated fleet (aggregation + every gate)?

A fleet of `--devices` simulated cameras (default 10,000): half are the wave (canary, on the candidate, a
shadow wave so that every gate has data), half the matched control cohort. Each device has one soak window:
~3,600 calls, a latency histogram over the agent's 13 buckets, errors, device-hours, crashes, restarts,
10-class top-class and 10-bin top-score histograms, shadow agreement and an install outcome. Generating the
windows is not timed. Timed, best of `--repeat` runs:

    stack          `FleetColumns.from_windows`: per-device records (Python objects) into numpy columns
    aggregate      `aggregate` of both cohorts from the columns (vectorised sums)
    gates          `judge(default_gates(shadow=True), canary, control)`: all 9 gates on the two cohorts
    from columns   aggregate + gates: the cost when the engine holds the columns (or reads them as arrays)
    from records   stack + aggregate + gates
    naive          baseline: the same cohort sums in a per-device Python loop over the records, then the gates

Reading Python objects costs about the same whichever way they are summed (stack is itself a loop over the
records), so the vectorised path pays off when the per-device figures arrive as arrays: keep them as columns.

Run: .venv/bin/python bench/rollout_gates.py [--devices 10000] [--repeat 5] [--quick]
(`--quick`: 1,000 devices, 3 repeats; what the test suite runs.)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import numpy as np

from edgefleet.server.rollouts.cohorts import (
    LATENCY_BOUNDS_MS,
    CohortTelemetry,
    DeviceWindow,
    FleetColumns,
    InstallOutcomes,
    ShadowAgreement,
    aggregate,
)
from edgefleet.server.rollouts.gates import default_gates, judge
from edgefleet.server.rollouts.verdicts import WaveJudgement

CLASSES = 10
SCORE_BINS = 10


def simulate(devices: int, seed: int = 7) -> tuple[list[DeviceWindow], np.ndarray]:
    """Per-device windows and the canary mask (first half)."""
    rng = np.random.default_rng(seed)
    bounds = np.array(LATENCY_BOUNDS_MS)
    canary = np.arange(devices) < devices // 2
    calls = rng.poisson(3600, devices)
    windows = []
    for i in range(devices):
        scale = 1.05 if canary[i] else 1.0
        latency = rng.lognormal(np.log(4.0 * scale), 0.5, 400)  # 400 draws shape each device's histogram
        hist = np.bincount(np.searchsorted(bounds, latency), minlength=len(bounds) + 1) * (calls[i] / 400)
        latency_counts = tuple(int(v) for v in hist)
        n = sum(latency_counts)
        windows.append(
            DeviceWindow(
                device_id=f"cam-{i:05d}",
                inference_count=n,
                error_count=int(rng.binomial(n, 0.005)),
                latency_counts=latency_counts,
                device_hours=1.0,
                crashes=int(rng.poisson(0.01)),
                worker_restarts=int(rng.poisson(0.02)),
                top_class_counts=tuple(int(v) for v in rng.multinomial(n, np.full(CLASSES, 1 / CLASSES))),
                top_score_counts=tuple(
                    int(v) for v in rng.multinomial(n, np.full(SCORE_BINS, 1 / SCORE_BINS))
                ),
                shadow=ShadowAgreement(
                    compared_calls=n // 10,
                    top1_agreed=int(rng.binomial(n // 10, 0.985)),
                    mean_abs_diff=0.01,
                    candidate_latency_counts=latency_counts,
                )
                if canary[i]
                else None,
                install="succeeded" if canary[i] else "none",
            )
        )
    return windows, canary


def naive_cohort(windows: Sequence[DeviceWindow]) -> CohortTelemetry:
    """The baseline: sum the records field by field in Python."""
    latency = [0.0] * (len(LATENCY_BOUNDS_MS) + 1)
    classes = [0.0] * CLASSES
    scores = [0.0] * SCORE_BINS
    shadow_latency = [0.0] * len(latency)
    calls = errors = crashes = restarts = compared = agreed = 0
    hours = abs_diff = 0.0
    installs = {"succeeded": 0, "failed": 0, "pending": 0, "none": 0}
    shadowed = False
    for w in windows:
        calls += w.inference_count
        errors += w.error_count
        hours += w.device_hours
        crashes += w.crashes
        restarts += w.worker_restarts
        for k, v in enumerate(w.latency_counts):
            latency[k] += v
        for k, v in enumerate(w.top_class_counts):
            classes[k] += v
        for k, v in enumerate(w.top_score_counts):
            scores[k] += v
        if w.shadow is not None:
            shadowed = True
            compared += w.shadow.compared_calls
            agreed += w.shadow.top1_agreed
            abs_diff += w.shadow.mean_abs_diff * w.shadow.compared_calls
            for k, v in enumerate(w.shadow.candidate_latency_counts):
                shadow_latency[k] += v
        installs[w.install] += 1
    shadow = (
        ShadowAgreement(compared, agreed, abs_diff / compared if compared else 0.0, tuple(shadow_latency))
        if shadowed
        else None
    )
    return CohortTelemetry(
        devices=len(windows),
        inference_count=calls,
        error_count=errors,
        latency_counts=tuple(latency),
        device_hours=hours,
        crashes=crashes,
        worker_restarts=restarts,
        top_class_counts=tuple(classes),
        top_score_counts=tuple(scores),
        shadow=shadow,
        installs=InstallOutcomes(installs["succeeded"], installs["failed"], installs["pending"]),
    )


def best_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1,000 devices, 3 repeats")
    args = parser.parse_args()
    devices, repeat = (1_000, 3) if args.quick else (args.devices, args.repeat)

    windows, canary_mask = simulate(devices)
    gates = default_gates(shadow=True)
    canary_windows = [w for w, c in zip(windows, canary_mask, strict=True) if c]
    control_windows = [w for w, c in zip(windows, canary_mask, strict=True) if not c]
    columns = FleetColumns.from_windows(windows)

    def vectorised() -> WaveJudgement:
        cols = FleetColumns.from_windows(windows)
        return judge(gates, aggregate(cols, canary_mask), aggregate(cols, ~canary_mask))

    def naive() -> WaveJudgement:
        return judge(gates, naive_cohort(canary_windows), naive_cohort(control_windows))

    canary, control = aggregate(columns, canary_mask), aggregate(columns, ~canary_mask)
    judgement = vectorised()
    if [v.line() for v in judgement.verdicts] != [
        v.line() for v in naive().verdicts
    ]:  # equal up to float rounding
        raise SystemExit("the vectorised and the naive aggregation disagree")

    def from_columns() -> WaveJudgement:
        return judge(gates, aggregate(columns, canary_mask), aggregate(columns, ~canary_mask))

    rows = [
        ("stack", best_ms(lambda: FleetColumns.from_windows(windows), repeat)),
        (
            "aggregate",
            best_ms(lambda: (aggregate(columns, canary_mask), aggregate(columns, ~canary_mask)), repeat),
        ),
        ("gates", best_ms(lambda: judge(gates, canary, control), repeat)),
        ("from columns", best_ms(from_columns, repeat)),
        ("from records", best_ms(vectorised, repeat)),
        ("naive", best_ms(naive, repeat)),
    ]
    print(
        f"rollout gates over {devices} devices ({canary.devices} canary, {control.devices} control), "
        f"best of {repeat}"
    )
    print(f"{'step':<14}{'ms':>10}")
    for name, ms in rows:
        print(f"{name:<14}{ms:>10.2f}")
    print(
        f"naive / from columns: {rows[5][1] / rows[3][1]:.1f}x; "
        f"naive / from records: {rows[5][1] / rows[4][1]:.1f}x"
    )
    print(f"judgement: {judgement.outcome.value} ({len(judgement.verdicts)} gates)")
    for verdict in judgement.verdicts:
        print(f"  {verdict.line()}")


if __name__ == "__main__":
    main()
