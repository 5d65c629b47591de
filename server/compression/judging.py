"""Judging a variant against the float32 model, and which runtimes compute it correctly
(`edgefleet.server.compression`, "Correct on a runtime")."""

from __future__ import annotations

import numpy as np

ATOL_RELATIVE = 1e-4  # float rounding between runtimes, relative to mean |float32 output|


class Judge:
    """Points lost against the float32 model (see the module docstring)."""

    def __init__(self, float_outputs: np.ndarray, labels: np.ndarray | None) -> None:
        self.float_outputs = float_outputs
        self.labels = labels
        if labels is not None:
            self.judged_by = "accuracy"
            self.float_accuracy = self.accuracy(float_outputs)
        else:
            self.judged_by = "mean abs error in % of float32's"
            self.scale = max(float(np.mean(np.abs(float_outputs))), np.finfo(np.float32).tiny)

    def accuracy(self, outputs: np.ndarray) -> float:
        return float(np.mean(outputs.reshape(len(outputs), -1).argmax(axis=1) == self.labels))

    def points_lost(self, outputs: np.ndarray) -> float:
        if self.labels is not None:
            return 100 * (self.float_accuracy - self.accuracy(outputs))
        return 100 * float(np.mean(np.abs(outputs - self.float_outputs))) / self.scale


def judge_runtimes(
    outputs: dict[str, np.ndarray], reference: str, judge: Judge, tolerance_points: float
) -> tuple[list[str], dict[str, str]]:
    """Which runtimes compute the variant correctly, and why the others do not (criteria 2 and 3)."""
    ok, failed = [], {}
    ref = outputs[reference]
    own_error = float(np.mean(np.abs(ref - judge.float_outputs)))
    atol = ATOL_RELATIVE * float(np.mean(np.abs(judge.float_outputs)))
    for runtime, out in outputs.items():
        if not np.isfinite(out).all():
            failed[runtime] = "wrong results: outputs are not finite"
            continue
        lost = judge.points_lost(out)
        disagreement = float(np.mean(np.abs(out - ref)))
        if lost > tolerance_points:
            failed[runtime] = (
                f"wrong results: {lost:.2f} points lost ({judge.judged_by}), "
                f"over the {tolerance_points} point tolerance"
            )
        elif disagreement > 2 * own_error + atol:
            failed[runtime] = (
                f"wrong results: outputs differ from {reference}'s by {disagreement:.3g} on average, over "
                f"twice the variant's own error against float32 ({own_error:.3g})"
            )
        else:
            ok.append(runtime)
    return ok, failed
