"""What the gates read: a cohort's telemetry summed over a soak window, and how device records are summed.

A device reports per model version every ~10 s; whoever reads the database sums those reports per device over
the wave's window into a `DeviceWindow` (one device, one model version). `FleetColumns.from_windows` stacks
many of them into numpy columns once, and `aggregate(columns, rows)` sums any subset of rows (the wave, its
control cohort) into a `CohortTelemetry` with a few vectorised sums, so judging a wave of 10,000 devices
costs milliseconds. Histograms of different widths (a device that never saw class 9 sends fewer class counts)
are padded with zeros to the widest.

The canary cohort is the wave's devices on the candidate version; the control cohort is a matched set of
devices that stay on the incumbent over the same window. Install outcomes matter only for the canary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from edgefleet.values import LATENCY_BOUNDS_MS

# The agents' latency histogram: LATENCY_BOUNDS_MS, then an open last bucket.
LATENCY_BUCKETS = len(LATENCY_BOUNDS_MS) + 1

InstallState = Literal["succeeded", "failed", "pending", "none"]
_INSTALL_CODES: dict[str, int] = {"none": 0, "pending": 1, "succeeded": 2, "failed": 3}


@dataclass(frozen=True)
class InstallOutcomes:
    """Install results of a wave's devices: succeeded = healthy after probation."""

    succeeded: int = 0
    failed: int = 0
    pending: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed

    @property
    def targeted(self) -> int:
        return self.succeeded + self.failed + self.pending


@dataclass(frozen=True)
class ShadowAgreement:
    """A shadow wave's comparison of the candidate with the serving model on the same inputs."""

    compared_calls: int = 0
    top1_agreed: int = 0  # calls where both models' top class was the same
    mean_abs_diff: float = 0.0  # mean |candidate output - serving output| over the compared calls
    candidate_latency_counts: tuple[float, ...] = ()  # over LATENCY_BOUNDS_MS, empty when not sent


@dataclass(frozen=True)
class CohortTelemetry:
    """One cohort's telemetry for one model version, summed over the soak window."""

    devices: int = 0
    inference_count: int = 0
    error_count: int = 0
    latency_counts: tuple[float, ...] = ()  # over latency_bounds_ms plus the open bucket
    device_hours: float = 0.0
    crashes: int = 0
    worker_restarts: int = 0
    top_class_counts: tuple[float, ...] = ()  # calls per top class index
    top_score_counts: tuple[float, ...] = ()  # calls per top-score bin over [0, 1]
    shadow: ShadowAgreement | None = None
    installs: InstallOutcomes = field(default_factory=InstallOutcomes)
    latency_bounds_ms: tuple[float, ...] = LATENCY_BOUNDS_MS


@dataclass(frozen=True)
class DeviceWindow:
    """One device's telemetry for one model version, summed over the soak window."""

    device_id: str
    inference_count: int = 0
    error_count: int = 0
    latency_counts: tuple[int, ...] = ()
    device_hours: float = 0.0
    crashes: int = 0
    worker_restarts: int = 0
    top_class_counts: tuple[int, ...] = ()
    top_score_counts: tuple[int, ...] = ()
    shadow: ShadowAgreement | None = None
    install: InstallState = "none"


def _stack(rows: Sequence[Sequence[float]], width: int | None = None) -> NDArray[np.float64]:
    widest = max((len(r) for r in rows), default=0) if width is None else width
    if all(len(r) == widest for r in rows):  # the common case: one C-level conversion
        return np.array(rows, dtype=np.float64).reshape(len(rows), widest)
    out = np.zeros((len(rows), widest), dtype=np.float64)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = row
    return out


@dataclass(frozen=True, eq=False)
class FleetColumns:
    """Many devices' `DeviceWindow`s as columns, one row per device (see the module docstring)."""

    device_ids: tuple[str, ...]
    inference_count: NDArray[np.float64]  # (n,)
    error_count: NDArray[np.float64]
    latency_counts: NDArray[np.float64]  # (n, LATENCY_BUCKETS)
    device_hours: NDArray[np.float64]
    crashes: NDArray[np.float64]
    worker_restarts: NDArray[np.float64]
    top_class_counts: NDArray[np.float64]  # (n, classes)
    top_score_counts: NDArray[np.float64]  # (n, score bins)
    shadow_reported: NDArray[np.bool_]
    shadow_compared: NDArray[np.float64]
    shadow_agreed: NDArray[np.float64]
    shadow_abs_diff_sum: NDArray[np.float64]  # mean_abs_diff x compared_calls, so that it sums
    shadow_latency_counts: NDArray[np.float64]  # (n, LATENCY_BUCKETS)
    install_code: NDArray[np.int8]

    @classmethod
    def from_windows(cls, windows: Sequence[DeviceWindow]) -> FleetColumns:
        """Stack per-device windows. Raises ValueError on a latency histogram of the wrong width."""
        for w in windows:
            if w.latency_counts and len(w.latency_counts) != LATENCY_BUCKETS:
                raise ValueError(
                    f"{w.device_id}: {len(w.latency_counts)} latency counts, not {LATENCY_BUCKETS}"
                )
        shadows = [w.shadow or ShadowAgreement() for w in windows]
        scalars = np.array(
            [
                (w.inference_count, w.error_count, w.device_hours, w.crashes, w.worker_restarts)
                for w in windows
            ],
            dtype=np.float64,
        ).reshape(len(windows), 5)
        shadow_scalars = np.array(
            [(s.compared_calls, s.top1_agreed, s.mean_abs_diff * s.compared_calls) for s in shadows],
            dtype=np.float64,
        ).reshape(len(windows), 3)
        return cls(
            device_ids=tuple(w.device_id for w in windows),
            inference_count=scalars[:, 0],
            error_count=scalars[:, 1],
            latency_counts=_stack([w.latency_counts for w in windows], LATENCY_BUCKETS),
            device_hours=scalars[:, 2],
            crashes=scalars[:, 3],
            worker_restarts=scalars[:, 4],
            top_class_counts=_stack([w.top_class_counts for w in windows]),
            top_score_counts=_stack([w.top_score_counts for w in windows]),
            shadow_reported=np.array([w.shadow is not None for w in windows], dtype=np.bool_),
            shadow_compared=shadow_scalars[:, 0],
            shadow_agreed=shadow_scalars[:, 1],
            shadow_abs_diff_sum=shadow_scalars[:, 2],
            shadow_latency_counts=_stack([s.candidate_latency_counts for s in shadows], LATENCY_BUCKETS),
            install_code=np.array([_INSTALL_CODES[w.install] for w in windows], dtype=np.int8),
        )

    def __len__(self) -> int:
        return len(self.device_ids)


def _tuple(values: NDArray[np.float64]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def aggregate(
    columns: FleetColumns, rows: NDArray[np.bool_] | NDArray[np.intp] | None = None
) -> CohortTelemetry:
    """Sum the selected rows (a boolean mask or row indices; all rows when None) into one cohort."""
    selected = np.arange(len(columns)) if rows is None else np.asarray(rows)
    if selected.dtype == np.bool_:
        if selected.shape != (len(columns),):
            raise ValueError("a row mask must have one entry per device")
        selected = np.flatnonzero(selected)
    shadow_rows = selected[columns.shadow_reported[selected]]
    shadow: ShadowAgreement | None = None
    if shadow_rows.size:
        compared = float(columns.shadow_compared[shadow_rows].sum())
        shadow = ShadowAgreement(
            compared_calls=int(compared),
            top1_agreed=int(columns.shadow_agreed[shadow_rows].sum()),
            mean_abs_diff=float(columns.shadow_abs_diff_sum[shadow_rows].sum()) / compared
            if compared
            else 0.0,
            candidate_latency_counts=_tuple(columns.shadow_latency_counts[shadow_rows].sum(axis=0)),
        )
    codes = np.bincount(columns.install_code[selected], minlength=len(_INSTALL_CODES))
    return CohortTelemetry(
        devices=int(selected.size),
        inference_count=int(columns.inference_count[selected].sum()),
        error_count=int(columns.error_count[selected].sum()),
        latency_counts=_tuple(columns.latency_counts[selected].sum(axis=0)),
        device_hours=float(columns.device_hours[selected].sum()),
        crashes=int(columns.crashes[selected].sum()),
        worker_restarts=int(columns.worker_restarts[selected].sum()),
        top_class_counts=_tuple(columns.top_class_counts[selected].sum(axis=0)),
        top_score_counts=_tuple(columns.top_score_counts[selected].sum(axis=0)),
        shadow=shadow,
        installs=InstallOutcomes(
            succeeded=int(codes[_INSTALL_CODES["succeeded"]]),
            failed=int(codes[_INSTALL_CODES["failed"]]),
            pending=int(codes[_INSTALL_CODES["pending"]]),
        ),
    )
