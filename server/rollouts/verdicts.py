"""What a gate answers: a verdict (pass / fail / inconclusive) with its evidence, and a wave's judgement.

The evidence is what goes into the audit trail and what an operator reads when a wave stops: the sample sizes
on both sides (and their unit), the statistic's name and value, the threshold it was held against, the
p-value or confidence bound where the gate has one, and one line in words.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Outcome(str, enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"  # too few samples or no data: the wave waits, it never advances on this


@dataclass(frozen=True)
class Evidence:
    """Why a gate decided as it did. Figures that do not apply are None."""

    canary_n: float
    control_n: float
    sample_unit: str  # "calls", "devices", "device-hours", "compared calls"
    statistic: str
    value: float | None
    threshold: float
    explanation: str
    p_value: float | None = None
    bound: float | None = None  # a one-sided confidence bound, in the statistic's unit
    confidence: float | None = None
    figures: tuple[tuple[str, float], ...] = ()  # further named figures (percentiles, rates, ...)

    def figure(self, name: str) -> float:
        """One of `figures` by name. Raises KeyError when it is absent."""
        for key, value in self.figures:
            if key == name:
                return value
        raise KeyError(name)


@dataclass(frozen=True)
class Verdict:
    gate: str
    outcome: Outcome
    evidence: Evidence

    def line(self) -> str:
        return f"{self.gate}: {self.outcome.value} - {self.evidence.explanation}"


@dataclass(frozen=True)
class WaveJudgement:
    """Fail if any gate fails; inconclusive if any is inconclusive and none fails (or there are no gates)."""

    outcome: Outcome
    verdicts: tuple[Verdict, ...]

    @property
    def failed(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.outcome is Outcome.FAIL)

    @property
    def inconclusive(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.outcome is Outcome.INCONCLUSIVE)

    def summary(self) -> str:
        return "\n".join([f"wave: {self.outcome.value}"] + [v.line() for v in self.verdicts])


def combine(verdicts: tuple[Verdict, ...]) -> WaveJudgement:
    """The wave's outcome from its gates' verdicts (see `WaveJudgement`)."""
    if any(v.outcome is Outcome.FAIL for v in verdicts):
        outcome = Outcome.FAIL
    elif not verdicts or any(v.outcome is Outcome.INCONCLUSIVE for v in verdicts):
        outcome = Outcome.INCONCLUSIVE
    else:
        outcome = Outcome.PASS
    return WaveJudgement(outcome=outcome, verdicts=verdicts)


def fmt(value: float, digits: int = 3) -> str:
    """A figure for an explanation line: significant digits, 'inf' and 'n/a' spelled out."""
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}"
