"""Every benchmark still runs: each one's quick mode, as a subprocess, must exit 0 and print figures.

The benches are not tests (they print figures instead of asserting on timings); this keeps them from rotting.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
# rollout_gates.py --quick is run by tests/unit/test_rollout_gates.py.
QUICK = (
    "deploy_scale",
    "fleet_load",
    "model_load",
    "overhead",
    "rollout_engine",
    "shadow_cost",
    "swap_phases",
    "swap_stall",
    "variants",
)


def test_every_bench_has_a_quick_mode_run_here() -> None:
    benches = {p.stem for p in BENCH.glob("*.py")} - {"swap_tables"}
    assert benches == {*QUICK, "rollout_gates"}, "add the new bench's --quick to QUICK"


@pytest.mark.parametrize("bench", QUICK)
def test_bench_quick_mode_runs_and_prints_figures(bench: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / f"{bench}.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"\d+\.\d+", done.stdout), done.stdout[-2000:]
