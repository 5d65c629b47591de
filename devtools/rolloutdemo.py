"""Staged-rollout settings for a fleet of three real devices, shared by `scripts/demo` and
tests/e2e/test_rollout_agents.py: the gate floors such a fleet can meet, and the live traffic that lets the
drift gate see a model with two classes swapped, and a telemetry interval the server's rate limit keeps up with.

    fleet.cli_json("rollout", "start", "digits", "2", "--to", "group:demo", "--waves", "1,2,3",
                   "--min-devices", "1", *SMALL_FLEET_GATES)
    InferenceLoad(sockets, *scene_calls(x_test, y_test))
"""

from __future__ import annotations

import numpy as np

from edgefleet.devtools.localfleet import LocalFleet

# Three devices are far below a camera fleet's sample floors: these lower them (one device a side).
SMALL_FLEET_GATES = [
    "--gate=install-failures.min_finished_devices=1", "--gate=install-failures.min_failed_devices=1",
    *(f"--gate={g}.min_devices=1" for g in ("error-rate", "latency", "crash-rate", "worker-restart-rate",
                                             "drift-top-class", "drift-top-score", "shadow-agreement",
                                             "shadow-latency")),
    "--gate=error-rate.min_calls=200", "--gate=latency.min_calls=200", "--gate=drift-top-class.min_calls=200",
    "--gate=drift-top-score.min_calls=200", "--gate=shadow-agreement.min_compared_calls=50",
    "--gate=shadow-latency.min_calls=50", "--gate=crash-rate.min_device_hours=0.001",
    "--gate=worker-restart-rate.min_device_hours=0.001",
    # One device a side on one shared machine: the canary and its control may differ in runtime and variant,
    # so latency may differ by more than a fleet's 20 %, and a retrained model's confidence (top score) moves.
    # The top-class histogram, which a swap of two classes moves, keeps the camera-fleet default (PSI 0.25).
    "--gate=latency.tolerance=2", "--gate=drift-top-score.max_psi=0.6",
]  # fmt: skip

# One telemetry report per 2 s: the server's sustained rate per device (ServerConfig.telemetry_per_device_per_s
# 0.5). LocalFleet's 1 s outruns it once the burst of 10 is spent, and reports then queue on the devices, ever
# further behind: minutes into the demo the gates judged reports minutes old and held waves for minutes.
TELEMETRY_ARGS = ("--telemetry-interval", "2")

SCENE_CLASS = 3  # the class a camera mostly sees; modelgen.build_swapped_digits_model swaps it with 8


def scene_calls(x: np.ndarray, y: np.ndarray) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """One call's inputs and the further calls' (`InferenceLoad(sockets, first, more=rest)`): three calls in
    four see a "3", the rest anything else. A camera's scene is not balanced, and with balanced traffic a
    swap of two classes leaves the top-class histogram as it was."""
    threes = [i for i in range(len(y)) if y[i] == SCENE_CLASS][:30]
    others = [i for i in range(len(y)) if y[i] != SCENE_CLASS][:10]
    calls = [[x[i : i + 1]] for i in threes + others]
    return calls[0], calls[1:]


def id_with_a_control(fleet: LocalFleet, *start_args: str, prefix: str = "ro-demo", tries: int = 50) -> str:
    """A rollout id whose plan gives every judged wave a control cohort (every wave but a shadow wave and the
    last), found as an operator would: `rollout start ... --dry-run` shows each wave's control count. With
    devices of different kinds, one a side, a wave whose device has no twin among the later ones has no
    control: its comparing gates stay inconclusive and the wave holds until an operator promotes it."""
    for i in range(tries):
        rollout_id = f"{prefix}{i:04d}"
        plan = fleet.cli_json("rollout", "start", *start_args, "--id", rollout_id, "--dry-run")
        judged = [w for w in plan["waves"][:-1] if not w["shadow"]]
        if all(w["control"] for w in judged):
            return rollout_id
    raise RuntimeError(
        f"no rollout id of {tries} gives every judged wave of {' '.join(start_args)} a control"
    )
