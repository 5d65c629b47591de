"""How long does the rollout engine take to judge a wave over 10,000 devices, from the database?

What the engine does each time it judges a wave (server.rollouts.engine `_judge`), on a real SQLite database
(SqlFleetStore + its RolloutStore, synchronous=FULL, WAL) holding `--reports` telemetry reports per device
(every report a JSON row, as devices send them) for `--devices` devices: half are the wave (on the
candidate), half its control cohort (on the incumbent). Timed, best of `--repeat`:

    read           `RolloutStore.telemetry_since` for every member since the wave started (one query per 500)
    sum            the reports into one DeviceWindow per device (`evaluate.wave_windows`)
    engine total   read + sum + columns + cohorts + every gate: what one judgement costs the engine
    baseline       columns + cohorts + every gate on windows already in memory (no database)

Writing the rows is not timed. The difference between the total and the baseline is the price of judging
from durable rows (a restart loses no sample) instead of counters held in memory.

Run: .venv/bin/python bench/rollout_engine.py [--devices 10000] [--reports 6] [--repeat 3] [--quick]
(`--quick`: 1,000 devices, 3 reports each, 2 repeats; what the test suite runs.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from edgefleet.server.rollouts import evaluate
from edgefleet.server.rollouts.cohorts import FleetColumns, aggregate
from edgefleet.server.rollouts.gates import judge
from edgefleet.server.rollouts.settings import build_gates
from edgefleet.server.storage import rows
from edgefleet.server.storage import schema as t
from edgefleet.server.storage.rollout_records import MemberRecord
from edgefleet.server.storage.sql import SqlFleetStore
from edgefleet.values import LATENCY_BOUNDS_MS, InferenceStats, OutputSummary, TelemetryReport

CANDIDATE = "detector/2/float32.tflite"
INCUMBENT = "detector/1/float32.tflite"


def _report(rng: np.random.Generator, target: str, at_ms: int, slow: float) -> TelemetryReport:
    calls = 600
    latency = np.histogram(rng.lognormal(np.log(4.0 * slow), 0.35, calls), (0.0, *LATENCY_BOUNDS_MS, np.inf))[
        0
    ]
    stats = InferenceStats(
        target_path=target,
        count=calls,
        errors=int(rng.binomial(calls, 0.001)),
        latency_bounds_ms=LATENCY_BOUNDS_MS,
        latency_counts=tuple(int(c) for c in latency),
        latency_sum_ms=float(calls * 4.0),
        latency_max_ms=40.0,
        outputs=OutputSummary(
            top_class_counts=tuple(int(c) for c in rng.multinomial(calls, [0.1] * 10)),
            top_score_counts=tuple(int(c) for c in rng.multinomial(calls, [0.1] * 10)),
        ),
        worker_crashes=int(rng.poisson(0.001)),
    )
    return TelemetryReport(at_ms=at_ms, inference=(stats,))


def fill(store: SqlFleetStore, devices: int, reports: int) -> tuple[list[MemberRecord], list[MemberRecord]]:
    rng = np.random.default_rng(0)
    canary, control, batch = [], [], []
    for i in range(devices):
        device_id = f"dev-{i:06d}"
        on_candidate = i % 2 == 0
        target = CANDIDATE if on_candidate else INCUMBENT
        for k in range(reports):
            report = _report(rng, target, 1_000_000 + k * 10_000, 1.05 if on_candidate else 1.0)
            batch.append(
                {"device_id": device_id, "at_ms": report.at_ms, "report": rows.telemetry_to_json(report)}
            )
        if on_candidate:
            canary.append(MemberRecord("ro-bench", device_id, 0, "canary", "healthy", CANDIDATE, 1, 1, 1))
        else:
            control.append(MemberRecord("ro-bench", device_id, 0, "control"))
        if len(batch) >= 5000:
            with store.engine.begin() as conn:
                conn.execute(t.telemetry.insert(), batch)
            batch.clear()
    if batch:
        with store.engine.begin() as conn:
            conn.execute(t.telemetry.insert(), batch)
    return canary, control


def best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--reports", type=int, default=6, help="telemetry reports per device in the window")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1,000 devices, 3 reports, 2 repeats")
    args = parser.parse_args()
    devices, reports, repeat = (1_000, 3, 2) if args.quick else (args.devices, args.reports, args.repeat)
    gates = build_gates([], shadow=False)
    with tempfile.TemporaryDirectory() as folder:
        store = SqlFleetStore(f"sqlite:///{Path(folder) / 'fleet.db'}")
        started = time.perf_counter()
        canary, control = fill(store, devices, reports)
        filled = time.perf_counter() - started
        with store.engine.connect() as conn:
            row_count = conn.execute(sa.select(sa.func.count()).select_from(t.telemetry)).scalar()
        ids = [m.device_id for m in canary + control]
        rollouts = store.rollouts()
        read_s, telemetry = best(lambda: rollouts.telemetry_since(ids, 0), repeat)
        sum_s, windows = best(lambda: evaluate.wave_windows(canary, control, telemetry, False), repeat)
        total, judgement = best(
            lambda: evaluate.judge_wave(gates, canary, control, rollouts.telemetry_since(ids, 0), False),
            repeat,
        )

        def baseline() -> Any:
            columns = FleetColumns.from_windows(windows)
            index = np.arange(len(columns))
            return judge(
                gates, aggregate(columns, index[: len(canary)]), aggregate(columns, index[len(canary) :])
            )

        base_s, _ = best(baseline, repeat)
        store.close()
    print(
        f"rollout engine: one wave judged over {devices:,} devices ({len(canary):,} canary, {len(control):,} control)"
    )
    print(
        f"  database      {row_count:,} telemetry rows ({reports} per device), written in {filled:.2f} s (not timed)"
    )
    print(f"  read          {read_s * 1000:9.1f} ms   telemetry_since for every member")
    print(f"  sum           {sum_s * 1000:9.1f} ms   reports -> one window per device")
    print(f"  engine total  {total * 1000:9.1f} ms   read + sum + columns + cohorts + {len(gates)} gates")
    print(f"  baseline      {base_s * 1000:9.1f} ms   columns + cohorts + gates on windows already in memory")
    print(
        f"  from the database costs {total / base_s if base_s else float('inf'):.1f}x the in-memory judgement"
    )
    print(
        f"  outcome: {judgement.outcome.value} ({', '.join(f'{v.gate} {v.outcome.value}' for v in judgement.verdicts)})"
    )


if __name__ == "__main__":
    main()
