"""Judging a variant against the float32 model, output by output, and which runtimes compute it correctly
(`edgefleet.server.compression`, "How a variant is judged" and "Correct on a runtime")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ATOL_RELATIVE = 1e-4  # float rounding between runtimes, relative to mean |float32 output|
ACCURACY = "accuracy"
RELATIVE_ERROR = "mean abs error in % of float32's"


@dataclass(frozen=True)
class OutputFigures:
    """How far one output of a variant is from float32's on the eval inputs."""

    metric: str
    points_lost: float
    max_abs_error: float
    mean_abs_error: float
    relative_l2: float  # ||out - float32|| / ||float32||
    accuracy: float | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "metric": self.metric,
            "points_lost": self.points_lost,
            "max_abs_error": self.max_abs_error,
            "mean_abs_error": self.mean_abs_error,
            "relative_l2": self.relative_l2,
            "accuracy": self.accuracy,
        }


class Judge:
    """Points lost against the float32 model, per output (see the module docstring of the package).

    An output with labels is judged by accuracy (float32's minus the variant's, in points); one without by
    its mean absolute error as a percentage of mean |float32 output|. A variant's figure is that of its
    worst output, which `limited_by` names.
    """

    def __init__(
        self,
        float_outputs: dict[str, np.ndarray],
        labels: dict[str, np.ndarray],
        steps: dict[str, float] | None = None,
    ) -> None:
        self.float_outputs = float_outputs
        self.labels = labels
        # Quantization step of each quantized output of the pushed model: two correct runtimes may round
        # a result to neighbouring steps, so up to one step of mean disagreement is rounding, not a bug.
        self.steps = steps or {}
        self.metrics = {name: ACCURACY if name in labels else RELATIVE_ERROR for name in float_outputs}
        self.judged_by = " / ".join(sorted(set(self.metrics.values())))
        self.float_accuracy = {name: self._accuracy(name, float_outputs[name]) for name in labels}
        tiny = float(np.finfo(np.float32).tiny)
        self.scale = {name: max(float(np.mean(np.abs(out))), tiny) for name, out in float_outputs.items()}

    def _accuracy(self, name: str, outputs: np.ndarray) -> float:
        return float(np.mean(outputs.reshape(len(outputs), -1).argmax(axis=1) == self.labels[name]))

    def accuracy(self, outputs: dict[str, np.ndarray]) -> float | None:
        """The accuracy of the one labelled output; None without labels or with several."""
        if len(self.labels) != 1:
            return None
        (name,) = self.labels
        return self._accuracy(name, outputs[name])

    def output_points_lost(self, name: str, out: np.ndarray) -> float:
        if name in self.labels:
            return 100 * (self.float_accuracy[name] - self._accuracy(name, out))
        return 100 * float(np.mean(np.abs(out - self.float_outputs[name]))) / self.scale[name]

    def points_lost(self, outputs: dict[str, np.ndarray]) -> tuple[float, str]:
        """The worst output's points lost, and its name."""
        lost = {name: self.output_points_lost(name, outputs[name]) for name in self.float_outputs}
        worst = max(lost, key=lambda name: lost[name])
        return lost[worst], worst

    def figures(self, outputs: dict[str, np.ndarray]) -> dict[str, OutputFigures]:
        figures = {}
        for name, reference in self.float_outputs.items():
            out = outputs[name]
            error = np.abs(out - reference)
            norm = max(float(np.linalg.norm(reference)), float(np.finfo(np.float32).tiny))
            figures[name] = OutputFigures(
                self.metrics[name],
                self.output_points_lost(name, out),
                float(error.max()),
                float(error.mean()),
                float(np.linalg.norm(out - reference)) / norm,
                self._accuracy(name, out) if name in self.labels else None,
            )
        return figures


def all_finite(outputs: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(out).all() for out in outputs.values())


def judge_runtimes(
    outputs: dict[str, dict[str, np.ndarray]], reference: str, judge: Judge, tolerance_points: float
) -> tuple[list[str], dict[str, str]]:
    """Which runtimes compute the variant correctly, and why the others do not (criteria 2 and 3), output by
    output: `outputs` is {runtime: {output name: values}}."""
    ok, failed = [], {}
    ref = outputs[reference]
    for runtime, outs in outputs.items():
        if not all_finite(outs):
            bad = sorted(name for name, out in outs.items() if not np.isfinite(out).all())
            failed[runtime] = f"wrong results: outputs are not finite ({', '.join(bad)})"
            continue
        problem = ""
        for name, float_out in judge.float_outputs.items():
            lost = judge.output_points_lost(name, outs[name])
            own_error = float(np.mean(np.abs(ref[name] - float_out)))
            atol = ATOL_RELATIVE * float(np.mean(np.abs(float_out))) + judge.steps.get(name, 0.0)
            disagreement = float(np.mean(np.abs(outs[name] - ref[name])))
            where = f" on {name}" if len(judge.float_outputs) > 1 else ""
            if lost > tolerance_points:
                problem = (
                    f"wrong results: {lost:.2f} points lost ({judge.metrics[name]}){where}, "
                    f"over the {tolerance_points} point tolerance"
                )
            elif disagreement > 2 * own_error + atol:
                problem = (
                    f"wrong results{where}: outputs differ from {reference}'s by {disagreement:.3g} on "
                    f"average, over twice the variant's own error against float32 ({own_error:.3g})"
                )
            if problem:
                break
        if problem:
            failed[runtime] = problem
        else:
            ok.append(runtime)
    return ok, failed
