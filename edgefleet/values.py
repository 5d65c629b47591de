"""Typed values that cross a boundary between layers or processes (proto <-> server <-> storage, proto <->
agent <-> state file). Small frozen dataclasses; `edgefleet.convert` is the one place they meet protobuf,
and `to_json` / `from_json` are how they are kept in a database column or the agent's state file.

No layer hands another a bare dict: what a device runs is a `ModelRef`, what it reports a `DeviceStatus`
or an `UpdateEvent`, what it can run `Capabilities`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from edgefleet.errors import InvalidRequestError

# Upper bounds of the latency histogram every agent reports (the last bucket is open); the rollout gates
# compare histograms over exactly these.
LATENCY_BOUNDS_MS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0)
STAGES = (
    "downloading",
    "downloaded",
    "verified",
    "activated",
    "healthy",
    "failed",
    "rolled_back",
    "deferred",  # an application on the device asked the agent to wait
    "shadow_ready",  # a shadow candidate is loaded beside the serving model
)


def _known(cls: type, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidRequestError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class ModelRef:
    """One signed model file, a TUF target of the fleet's repository."""

    target_path: str  # "digits/2/float32.tflite"
    model_name: str = ""
    version: str = ""
    variant: str = ""
    sha256: str = ""
    length: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> ModelRef:
        """Raises InvalidRequestError for anything but a ModelRef's fields with the right types."""
        known = _known(cls, data)
        try:
            ref = cls(
                target_path=str(known["target_path"]),
                model_name=str(known.get("model_name", "")),
                version=str(known.get("version", "")),
                variant=str(known.get("variant", "")),
                sha256=str(known.get("sha256", "")),
                length=int(known.get("length", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidRequestError(f"malformed model reference: {e}") from e
        if not ref.target_path:
            raise InvalidRequestError("malformed model reference: empty target path")
        return ref

    @classmethod
    def optional(cls, data: Any) -> ModelRef | None:
        """`from_json` for a column or field that may be empty (None or {})."""
        return cls.from_json(data) if data else None


@dataclass(frozen=True)
class Capabilities:
    """What a device can run; sent at enrollment and on every connect."""

    runtime: str = ""  # "ai-edge-litert" or "tflite-runtime"
    runtime_version: str = ""
    cpu_arch: str = ""
    cpu_count: int = 0
    memory_total_bytes: int = 0
    memory_available_bytes: int = 0
    disk_free_bytes: int = 0
    accelerators: tuple[str, ...] = ()
    hardware_class: str = ""
    latency_budget_ms: float = 0.0  # 0 = none
    timezone: str = ""  # IANA name, e.g. "Europe/Berlin"; "" = UTC (for maintenance windows in local time)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["accelerators"] = list(self.accelerators)
        return data

    @classmethod
    def from_json(cls, data: Any) -> Capabilities:
        known = _known(cls, data or {})
        try:
            return cls(
                runtime=str(known.get("runtime", "")),
                runtime_version=str(known.get("runtime_version", "")),
                cpu_arch=str(known.get("cpu_arch", "")),
                cpu_count=int(known.get("cpu_count", 0)),
                memory_total_bytes=int(known.get("memory_total_bytes", 0)),
                memory_available_bytes=int(known.get("memory_available_bytes", 0)),
                disk_free_bytes=int(known.get("disk_free_bytes", 0)),
                accelerators=tuple(str(a) for a in known.get("accelerators", ())),
                hardware_class=str(known.get("hardware_class", "")),
                latency_budget_ms=float(known.get("latency_budget_ms", 0.0)),
                timezone=str(known.get("timezone", "")),
            )
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(f"malformed capabilities: {e}") from e


@dataclass(frozen=True)
class DeviceStatus:
    """A device's own account of what it runs: the truth, sent on every connect and after every change."""

    current: ModelRef | None
    previous: ModelRef | None
    capabilities: Capabilities | None  # None: unchanged since the last report
    agent_version: str = ""
    bad_targets: tuple[str, ...] = ()
    sent_at_ms: int = 0  # the device's clock; 0 = not set
    sequence: int = 0  # strictly increasing per device: older reports are ignored


@dataclass(frozen=True)
class UpdateEvent:
    """One step of an update on a device, as it reports it."""

    target_path: str
    stage: str  # one of STAGES
    reason: str = ""
    at_ms: int = 0  # the device's clock; 0 = not set
    command_id: str = ""  # set when the event answers a rollback command
    sequence: int = 0  # from the device's persisted counter (shared with status reports); 0 = not set
    target_sha256: str = ""  # the signed target it reports on
    deployment_id: str = ""  # the assignment it acts on
    repeated: bool = False  # sent again on a new stream, in case the last one lost it

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise InvalidRequestError(f"unknown update stage {self.stage!r}")


TOP_SCORE_BINS = 10  # equal bins over [0, 1] for the top score of each call
MAX_TOP_CLASSES = 1024  # top-class histograms wider than this are refused


@dataclass(frozen=True)
class OutputSummary:
    """What a model version answered over one interval, as histograms (never raw inputs or outputs)."""

    top_class_counts: tuple[int, ...] = ()  # calls per top-class index
    top_score_counts: tuple[int, ...] = ()  # calls per top-score bin (TOP_SCORE_BINS over [0, 1])


@dataclass(frozen=True)
class ShadowStats:
    """A shadow candidate compared with the serving model on sampled live inputs over one interval."""

    candidate_target_path: str
    compared_calls: int = 0
    top1_agreed: int = 0
    abs_diff_sum: float = 0.0  # sum over compared calls of the mean |candidate - serving| of the first output
    candidate_latency_counts: tuple[int, ...] = ()  # over the serving histogram's latency bounds
    candidate_errors: int = 0
    skipped_calls: int = 0  # sampled but not run: over the rate limit or the CPU budget


@dataclass(frozen=True)
class InferenceStats:
    """Inference counters for one model version over one reporting interval."""

    target_path: str
    count: int = 0
    errors: int = 0
    latency_bounds_ms: tuple[float, ...] = ()
    latency_counts: tuple[int, ...] = ()  # len(latency_bounds_ms) + 1
    latency_sum_ms: float = 0.0
    latency_max_ms: float = 0.0
    outputs: OutputSummary | None = None
    shadow: ShadowStats | None = None  # a candidate compared beside this serving model
    worker_crashes: int = 0  # unexpected deaths of the worker; an intended hot-swap restart is not one
    worker_restarts: int = 0


@dataclass(frozen=True)
class HealthSample:
    cpu_percent: float = 0.0
    memory_used_bytes: int = 0
    memory_total_bytes: int = 0
    disk_free_bytes: int = 0
    temperature_celsius: float | None = None
    uptime_seconds: float = 0.0


@dataclass(frozen=True)
class TelemetryReport:
    at_ms: int
    health: HealthSample = field(default_factory=HealthSample)
    inference: tuple[InferenceStats, ...] = ()
    dropped_reports: int = 0
