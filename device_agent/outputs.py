"""Output summaries: what a model version answered, as two small histograms, for the rollout's drift gate.

Per call, from the first output tensor only:
    top class  the index, on the last axis, of the largest value (the row holding the call's largest value
               when the output has several rows); classes past MAX_TOP_CLASSES - 1 count in the last bin
    top score  that value, dequantized with the tensor's scale and zero point for int8/uint8 outputs,
               clipped to [0, 1], in TOP_SCORE_BINS equal bins

Never raw inputs or outputs: only these counts leave the device. One `np.argmax` and a few integer
operations per call (bench figures in docs/reliability.md), done by the serving thread after the answer is in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgefleet.values import MAX_TOP_CLASSES, TOP_SCORE_BINS, OutputSummary

QUANTIZED = ("int8", "uint8")


@dataclass(frozen=True)
class Quantization:
    """The first output's (scale, zero point); scale 0 = not quantized."""

    scale: float = 0.0
    zero_point: int = 0


NOT_QUANTIZED = Quantization()


def top_of(output: np.ndarray, quantization: Quantization = NOT_QUANTIZED) -> tuple[int, float]:
    """(top class, top score) of one call's first output; the score is dequantized but not clipped."""
    if output.size == 0:
        return 0, math.nan
    flat = output.reshape(-1)
    index = int(np.argmax(flat))
    last = output.shape[-1] if output.ndim else 1
    value = float(flat[index])
    if quantization.scale > 0 and output.dtype.name in QUANTIZED:
        value = (value - quantization.zero_point) * quantization.scale
    return index % max(last, 1), value


def score_bin(score: float) -> int:
    """The bin of a top score, clipped to [0, 1]; a NaN lands in bin 0 (a broken answer is not a high one)."""
    if not score > 0:  # also NaN
        return 0
    return min(int(score * TOP_SCORE_BINS), TOP_SCORE_BINS - 1)


@dataclass
class OutputTally:
    """The histograms of one model version over one reporting interval (not thread-safe: the caller locks)."""

    classes: list[int] = field(default_factory=list)  # grown to the highest class seen
    scores: list[int] = field(default_factory=lambda: [0] * TOP_SCORE_BINS)

    def add(self, top_class: int, top_score: float) -> None:
        top_class = min(top_class, MAX_TOP_CLASSES - 1)
        if top_class >= len(self.classes):
            self.classes.extend([0] * (top_class + 1 - len(self.classes)))
        self.classes[top_class] += 1
        self.scores[score_bin(top_score)] += 1

    def summary(self) -> OutputSummary | None:
        if not self.classes:
            return None
        return OutputSummary(tuple(self.classes), tuple(self.scores))
