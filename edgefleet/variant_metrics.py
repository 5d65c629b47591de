"""What the server measured of one variant of a model version, as a typed value.

The figures travel as JSON (the `details` the server stores with a model file, `details_json` on the wire to
the CLI, and the `metrics` the operator signs into the target); this is the one place their keys are read.
`server.compression` writes them, `server.variants` chooses by them, the CLI prints them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _per_runtime(value: Any, cast: type[float] | type[int]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): cast(v or 0) for k, v in value.items()}


@dataclass(frozen=True)
class VariantMetrics:
    variant: str = ""
    recipe: str = ""
    size_bytes: int = 0
    wire_bytes: int = 0
    wire_encoding: str = "identity"
    judged_by: str = ""
    accuracy: float | None = None  # with labels: share of eval rows right, on the reference runtime
    accuracy_delta_points: float | None = None  # points lost against float32 (None: outputs not finite)
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)  # runtime -> median ms per invoke
    peak_memory_bytes: int = 0
    peak_memory_bytes_by_runtime: dict[str, int] = field(default_factory=dict)
    model_memory_bytes: int | None = None  # beyond the runtime's own fixed cost; None: not measured
    model_memory_bytes_by_runtime: dict[str, int] = field(default_factory=dict)
    runtimes_ok: tuple[str, ...] | None = None  # None: not measured (an upload without variants)
    runtimes_failed: dict[str, str] = field(default_factory=dict)
    excluded: str = ""  # why it is never assigned; "" when it may be
    limited_by: str = ""  # the output whose error limited it, when it has several

    @classmethod
    def from_details(cls, details: Mapping[str, Any], length: int = 0) -> VariantMetrics:
        """From the stored JSON; missing figures take their defaults (older records lack some)."""
        ok = details.get("runtimes_ok")
        latency = details.get("latency_ms")
        return cls(
            variant=str(details.get("variant", "")),
            recipe=str(details.get("recipe", "")),
            size_bytes=int(details.get("size_bytes") or length),
            wire_bytes=int(details.get("wire_bytes") or length),
            wire_encoding=str(details.get("wire_encoding", "identity")),
            judged_by=str(details.get("judged_by", "")),
            accuracy=_float_or_none(details.get("accuracy")),
            accuracy_delta_points=_float_or_none(details.get("accuracy_delta_points")),
            max_abs_error=_float_or_none(details.get("max_abs_error")),
            mean_abs_error=_float_or_none(details.get("mean_abs_error")),
            latency_ms=_per_runtime(latency, float),
            peak_memory_bytes=int(details.get("peak_memory_bytes") or 0),
            peak_memory_bytes_by_runtime=_per_runtime(details.get("peak_memory_bytes_by_runtime"), int),
            model_memory_bytes=None
            if "model_memory_bytes" not in details
            else int(details["model_memory_bytes"] or 0),
            model_memory_bytes_by_runtime=_per_runtime(details.get("model_memory_bytes_by_runtime"), int),
            runtimes_ok=None if ok is None else tuple(str(r) for r in ok),
            runtimes_failed={str(k): str(v) for k, v in (details.get("runtimes_failed") or {}).items()},
            excluded=str(details.get("excluded") or ""),
            limited_by=str(details.get("limited_by") or ""),
        )

    def memory_on(self, runtime: str) -> int:
        """The memory this variant needs on `runtime` beyond the runtime's own fixed cost (the peak when
        only that was measured)."""
        if self.model_memory_bytes is not None:
            return self.model_memory_bytes_by_runtime.get(runtime, self.model_memory_bytes)
        return self.peak_memory_bytes_by_runtime.get(runtime, self.peak_memory_bytes)

    def latency_on(self, runtime: str) -> float:
        return self.latency_ms.get(runtime, 0.0)

    @property
    def points_lost(self) -> float:
        """Accuracy points lost against float32 (0 when unknown: the original itself)."""
        return self.accuracy_delta_points or 0.0
