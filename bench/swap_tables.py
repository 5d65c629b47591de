"""The tables `bench/swap_stall.py` prints (kept apart so that file stays one job: running the swaps)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from swap_stall import Outcome


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def print_tables(outcomes: list[Outcome], args: argparse.Namespace) -> None:
    print()
    print(
        f"Swap stall: {args.callers} caller threads in a tight loop, {args.swaps} swaps per row, "
        f"baseline {args.baseline:.1f} s. Latencies in ms."
    )
    print("STALL = max(0, max latency of calls overlapping a swap window - baseline p99)")
    print("typ. = median over swaps of the worst call in the swap window - the same for the control windows")
    head = (
        f"{'runtime':<15} {'model':<7} {'serving':<7} {'base p50':>9} {'base p99':>9} {'base max':>9} "
        f"{'swap p99':>9} {'swap max':>9} {'load max':>9} {'switch max':>10} {'ctl max':>8} {'STALL':>8} {'typ.':>7}"
    )
    print(head)
    print("-" * len(head))
    for o in outcomes:
        p = np.percentile
        print(
            f"{o.runtime:<15} {o.size:<7} {o.mode:<7} {_fmt(p(o.base, 50)):>9} {_fmt(p(o.base, 99)):>9} "
            f"{_fmt(o.base.max()):>9} {_fmt(p(o.swap, 99)):>9} {_fmt(o.swap.max()):>9} "
            f"{_fmt(o.load_max):>9} {_fmt(o.switch_max):>10} {_fmt(max(o.per_control_max)):>8} "
            f"{_fmt(o.stall_ms):>8} {o.typical_stall_ms:>+7.2f}"
        )
    print()
    head = (
        f"{'runtime':<15} {'model':<7} {'serving':<7} {'calls':>7} {'in swaps':>9} {'failed':>7} "
        f"{'inconsistent':>12} {'load ms (mean/max)':>19} {'retire ms (mean/max)':>21}  {'calls per caller':<16}  calls per target"
    )
    print(head)
    print("-" * len(head))
    for o in outcomes:
        load = f"{np.mean(o.load_s) * 1e3:.1f}/{np.max(o.load_s) * 1e3:.1f}"
        retire = f"{np.mean(o.retire_s) * 1e3:.1f}/{np.max(o.retire_s) * 1e3:.1f}"
        targets = ", ".join(f"{k}={v}" for k, v in sorted(o.per_target.items()))
        print(
            f"{o.runtime:<15} {o.size:<7} {o.mode:<7} {o.calls:>7} {len(o.swap):>9} {o.failed:>7} "
            f"{o.inconsistent:>12} {load:>19} {retire:>21}  {'/'.join(map(str, o.per_caller)):<16}  {targets}"
        )
    print()
    print("Worst call overlapping each swap window / its control window (ms):")
    for o in outcomes:
        pairs = " ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(o.per_swap_max, o.per_control_max, strict=True))
        print(f"  {o.runtime:<15} {o.size:<7} {o.mode:<7} {pairs}")
    for o in outcomes:
        for e in o.errors:
            print(f"  ! {o.runtime} {o.size} {o.mode}: {e}")
