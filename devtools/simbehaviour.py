"""What a simulated device's model does, drawn from a distribution the test chooses: how an install goes,
and the telemetry each interval reports (latency histogram over the agent's bounds, errors, output
summaries, worker crashes, and shadow stats while a candidate runs beside the serving model).

    behaviour = {"1": ModelBehaviour(), "2": ModelBehaviour(latency_median_ms=7.0)}.get  # by version
    stats = draw_stats(rng, target_path, behaviour_of_serving, calls, shadow=(candidate path, its behaviour))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgefleet.v1 import common_pb2
from edgefleet.values import LATENCY_BOUNDS_MS, TOP_SCORE_BINS

_EDGES = np.array((0.0, *LATENCY_BOUNDS_MS, np.inf))
_SCORE_EDGES = np.linspace(0.0, 1.0, TOP_SCORE_BINS + 1)
# A camera's classes are far from uniform: swapping two of them shows in the output histogram.
CAMERA_CLASSES = (0.3, 0.15, 0.1, 0.1, 0.08, 0.07, 0.06, 0.05, 0.05, 0.04)


@dataclass(frozen=True)
class ModelBehaviour:
    latency_median_ms: float = 4.0
    latency_sigma: float = 0.35  # of log latency
    error_rate: float = 0.0
    class_probs: tuple[float, ...] = CAMERA_CLASSES
    score_alpha: float = 8.0  # top score ~ Beta(alpha, beta)
    score_beta: float = 2.0
    crashes_per_report: float = 0.0  # Poisson mean of worker crashes per report
    install_failure_rate: float = 0.0  # share of devices whose install fails
    transient_install_failure: bool = False  # a device's install fails only its first time (a retry works)
    agreement: float = 0.99  # as a shadow candidate: top-1 agreement with the serving model
    mean_abs_diff: float = 0.01

    def swapped(self, a: int, b: int) -> ModelBehaviour:
        """The same model with classes a and b swapped (a bad model that passes every offline check)."""
        probs = list(self.class_probs)
        probs[a], probs[b] = probs[b], probs[a]
        return ModelBehaviour(**{**self.__dict__, "class_probs": tuple(probs)})


BehaviourOf = Callable[[str], ModelBehaviour]  # target path -> behaviour


def by_version(versions: dict[str, ModelBehaviour], default: ModelBehaviour | None = None) -> BehaviourOf:
    """Behaviour by the version in a target path (`name/VERSION/variant.tflite`)."""
    fallback = default or ModelBehaviour()

    def of(target_path: str) -> ModelBehaviour:
        parts = target_path.split("/")
        return versions.get(parts[1] if len(parts) > 2 else "", fallback)

    return of


def latency_counts(rng: np.random.Generator, b: ModelBehaviour, calls: int) -> list[int]:
    samples = rng.lognormal(np.log(b.latency_median_ms), b.latency_sigma, calls)
    return [int(c) for c in np.histogram(samples, _EDGES)[0]]


def draw_stats(
    rng: np.random.Generator,
    target_path: str,
    b: ModelBehaviour,
    calls: int,
    shadow: tuple[str, ModelBehaviour] | None = None,
) -> common_pb2.InferenceStats:
    """One interval's stats of the serving model (and of a shadow candidate beside it)."""
    probs = np.asarray(b.class_probs, dtype=float)
    scores = rng.beta(b.score_alpha, b.score_beta, calls)
    stats = common_pb2.InferenceStats(
        target_path=target_path,
        count=calls,
        errors=int(rng.binomial(calls, b.error_rate)) if b.error_rate else 0,
        latency_bounds_ms=LATENCY_BOUNDS_MS,
        latency_counts=latency_counts(rng, b, calls),
        outputs=common_pb2.OutputSummary(
            top_class_counts=[int(c) for c in rng.multinomial(calls, probs / probs.sum())],
            top_score_counts=[int(c) for c in np.histogram(scores, _SCORE_EDGES)[0]],
        ),
        worker_crashes=int(rng.poisson(b.crashes_per_report)) if b.crashes_per_report else 0,
    )
    if shadow is not None:
        path, candidate = shadow
        compared = calls // 2
        stats.shadow.CopyFrom(
            common_pb2.ShadowStats(
                candidate_target_path=path,
                compared_calls=compared,
                top1_agreed=int(rng.binomial(compared, candidate.agreement)),
                abs_diff_sum=candidate.mean_abs_diff * compared,
                candidate_latency_counts=latency_counts(rng, candidate, compared),
            )
        )
    return stats
