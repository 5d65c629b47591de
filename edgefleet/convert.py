"""The one place protobuf messages become typed values (`edgefleet.values`) and back, with the checks a
service needs before it trusts a peer's message: sizes, ranges, finite numbers, times that are times.

Raises InvalidRequestError naming the field at fault.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, fields

from edgefleet.errors import InvalidRequestError
from edgefleet.v1 import common_pb2, device_pb2
from edgefleet.values import (
    MAX_TOP_CLASSES,
    TOP_SCORE_BINS,
    Capabilities,
    DeviceStatus,
    HealthSample,
    InferenceStats,
    ModelRef,
    OutputSummary,
    ShadowStats,
    TelemetryReport,
    UpdateEvent,
)

MAX_TARGET_PATH = 512
# Times devices send, in ms since 1970; 0 = not set. A clock a year off is skew to report; a negative time or
# one more than ten years ahead is not a time.
MAX_AHEAD_MS = 10 * 365 * 86_400_000
MAX_REASON = 2000
MAX_BAD_TARGETS = 256


def check_time(what: str, at_ms: int) -> int:
    if not 0 <= at_ms <= int(time.time() * 1000) + MAX_AHEAD_MS:
        raise InvalidRequestError(f"{what} {at_ms} is not a time in ms since 1970")
    return at_ms


# ---- model references ------------------------------------------------------------------------------------


def ref_from_proto(ref: common_pb2.ModelRef) -> ModelRef | None:
    """None when unset. Raises InvalidRequestError for a target path no real target has."""
    if not ref.target_path:
        return None
    if len(ref.target_path) > MAX_TARGET_PATH:
        raise InvalidRequestError("target path is too long")
    return ModelRef(ref.target_path, ref.model_name, ref.version, ref.variant, ref.sha256, ref.length)


def ref_to_proto(ref: ModelRef | None) -> common_pb2.ModelRef:
    if ref is None:
        return common_pb2.ModelRef()
    return common_pb2.ModelRef(**ref.to_json())


# ---- capabilities ----------------------------------------------------------------------------------------


def capabilities_from_proto(caps: common_pb2.Capabilities) -> Capabilities:
    for key in ("memory_total_bytes", "memory_available_bytes", "disk_free_bytes", "cpu_count"):
        if getattr(caps, key) < 0:
            raise InvalidRequestError(f"capabilities.{key} is negative")
    if not math.isfinite(caps.latency_budget_ms) or caps.latency_budget_ms < 0:
        raise InvalidRequestError("capabilities.latency_budget_ms must be a finite number >= 0")
    # Stored with the device and returned by ListDevices: one device must not be able to make that answer
    # larger than a client accepts (4 MiB by default).
    for key in ("runtime", "runtime_version", "cpu_arch", "hardware_class"):
        if len(getattr(caps, key)) > 128:
            raise InvalidRequestError(f"capabilities.{key} is longer than 128 characters")
    if len(caps.accelerators) > 32 or any(len(a) > 128 for a in caps.accelerators):
        raise InvalidRequestError("too many accelerators, or too long names")
    values = {f.name: getattr(caps, f.name) for f in fields(Capabilities)}
    return Capabilities(**{**values, "accelerators": tuple(caps.accelerators)})


def capabilities_to_proto(caps: Capabilities | None) -> common_pb2.Capabilities:
    if caps is None:
        return common_pb2.Capabilities()
    return common_pb2.Capabilities(**caps.to_json())


# ---- what a device reports -------------------------------------------------------------------------------


def status_from_proto(status: device_pb2.DeviceStatus) -> DeviceStatus:
    if status.sequence >= 2**63:  # stored as a signed 64-bit integer
        raise InvalidRequestError("status sequence is out of range")
    return DeviceStatus(
        current=ref_from_proto(status.current),
        previous=ref_from_proto(status.previous),
        capabilities=capabilities_from_proto(status.capabilities)
        if status.HasField("capabilities")
        else None,
        agent_version=status.agent_version[:64],
        bad_targets=tuple(t[:MAX_TARGET_PATH] for t in status.bad_targets[:MAX_BAD_TARGETS]),
        sent_at_ms=check_time("status sent_at_unix_ms", status.sent_at_unix_ms),
        sequence=status.sequence,
    )


def status_to_proto(status: DeviceStatus) -> device_pb2.DeviceStatus:
    return device_pb2.DeviceStatus(
        current=ref_to_proto(status.current),
        previous=ref_to_proto(status.previous),
        capabilities=capabilities_to_proto(status.capabilities) if status.capabilities else None,
        agent_version=status.agent_version,
        bad_targets=list(status.bad_targets),
        sent_at_unix_ms=status.sent_at_ms,
        sequence=status.sequence,
    )


def stage_name(stage: int) -> str:
    """`UPDATE_STAGE_HEALTHY` -> "healthy"; "" for a value this version does not know."""
    if stage not in common_pb2.UpdateStage.values() or stage == common_pb2.UPDATE_STAGE_UNSPECIFIED:
        return ""
    return common_pb2.UpdateStage.Name(stage).removeprefix("UPDATE_STAGE_").lower()  # type: ignore[arg-type]


def stage_value(stage: str) -> common_pb2.UpdateStage.ValueType:
    return common_pb2.UpdateStage.Value(f"UPDATE_STAGE_{stage.upper()}")


def event_from_proto(event: device_pb2.UpdateEvent) -> UpdateEvent:
    if len(event.target_path) > MAX_TARGET_PATH:
        raise InvalidRequestError("event target path is too long")
    if len(event.command_id) > 64 or len(event.deployment_id) > 64:
        raise InvalidRequestError("event command or deployment id is too long")
    if len(event.target_sha256) > 64:
        raise InvalidRequestError("event target sha256 is too long")
    if event.sequence >= 2**63:
        raise InvalidRequestError("event sequence is beyond what the server stores")
    return UpdateEvent(
        target_path=event.target_path,
        stage=stage_name(event.stage),
        reason=event.reason[:MAX_REASON],
        at_ms=check_time("event at_unix_ms", event.at_unix_ms),
        command_id=event.command_id,
        sequence=event.sequence,
        target_sha256=event.target_sha256,
        deployment_id=event.deployment_id,
        repeated=event.repeated,
    )


def event_to_proto(event: UpdateEvent) -> device_pb2.UpdateEvent:
    return device_pb2.UpdateEvent(
        target_path=event.target_path,
        stage=stage_value(event.stage),
        reason=event.reason,
        at_unix_ms=event.at_ms,
        command_id=event.command_id,
        sequence=event.sequence,
        target_sha256=event.target_sha256,
        deployment_id=event.deployment_id,
        repeated=event.repeated,
    )


def _check_model_summaries(stats: common_pb2.InferenceStats) -> None:
    """The output summary, the shadow comparison and the worker counters of one model version."""
    out = stats.outputs
    if len(out.top_class_counts) > MAX_TOP_CLASSES or len(out.top_score_counts) > TOP_SCORE_BINS:
        raise InvalidRequestError("telemetry output summary has too many bins")
    shadow = stats.shadow
    counts = [*out.top_class_counts, *out.top_score_counts, stats.worker_crashes, stats.worker_restarts]
    counts += [shadow.compared_calls, shadow.top1_agreed, shadow.candidate_errors, shadow.skipped_calls]
    counts += shadow.candidate_latency_counts
    if any(c < 0 for c in counts):
        raise InvalidRequestError("telemetry counts must not be negative")
    if len(shadow.candidate_latency_counts) > 65:
        raise InvalidRequestError("telemetry shadow histogram has too many buckets")
    if len(shadow.candidate_target_path) > MAX_TARGET_PATH:
        raise InvalidRequestError("telemetry shadow target path is too long")
    if shadow.top1_agreed > shadow.compared_calls or shadow.abs_diff_sum < 0:
        raise InvalidRequestError("telemetry shadow agreement is inconsistent")


def _shadow_from_proto(shadow: common_pb2.ShadowStats) -> ShadowStats:
    values = {f.name: getattr(shadow, f.name) for f in fields(ShadowStats)}
    return ShadowStats(**{**values, "candidate_latency_counts": tuple(shadow.candidate_latency_counts)})


def telemetry_from_proto(report: device_pb2.TelemetryReport) -> TelemetryReport:
    """Refuses NaN/infinite figures, negative counts and oversized histograms."""
    health = report.health
    figures = [health.cpu_percent, health.uptime_seconds]
    if health.HasField("temperature_celsius"):
        figures.append(health.temperature_celsius)
    if len(report.inference) > 64:
        raise InvalidRequestError("telemetry has too many model versions")
    for stats in report.inference:
        if len(stats.target_path) > MAX_TARGET_PATH:
            raise InvalidRequestError("telemetry target path is too long")
        figures += [stats.latency_sum_ms, stats.latency_max_ms, *stats.latency_bounds_ms]
        if stats.count < 0 or stats.errors < 0 or any(c < 0 for c in stats.latency_counts):
            raise InvalidRequestError("telemetry counts must not be negative")
        if len(stats.latency_bounds_ms) > 64 or len(stats.latency_counts) > 65:
            raise InvalidRequestError("telemetry histogram has too many buckets")
        _check_model_summaries(stats)
        if stats.HasField("shadow"):
            figures.append(stats.shadow.abs_diff_sum)
    if not all(math.isfinite(f) for f in figures):
        raise InvalidRequestError("telemetry figures must be finite numbers")
    counts = (health.memory_used_bytes, health.memory_total_bytes, health.disk_free_bytes)
    if report.dropped_reports < 0 or any(c < 0 for c in counts):
        raise InvalidRequestError("telemetry counts must not be negative")
    return TelemetryReport(
        at_ms=check_time("telemetry at_unix_ms", report.at_unix_ms),
        health=HealthSample(
            cpu_percent=health.cpu_percent,
            memory_used_bytes=health.memory_used_bytes,
            memory_total_bytes=health.memory_total_bytes,
            disk_free_bytes=health.disk_free_bytes,
            temperature_celsius=health.temperature_celsius
            if health.HasField("temperature_celsius")
            else None,
            uptime_seconds=health.uptime_seconds,
        ),
        inference=tuple(
            InferenceStats(
                target_path=s.target_path,
                count=s.count,
                errors=s.errors,
                latency_bounds_ms=tuple(s.latency_bounds_ms),
                latency_counts=tuple(s.latency_counts),
                latency_sum_ms=s.latency_sum_ms,
                latency_max_ms=s.latency_max_ms,
                outputs=OutputSummary(tuple(s.outputs.top_class_counts), tuple(s.outputs.top_score_counts))
                if s.HasField("outputs")
                else None,
                shadow=_shadow_from_proto(s.shadow) if s.HasField("shadow") else None,
                worker_crashes=s.worker_crashes,
                worker_restarts=s.worker_restarts,
            )
            for s in report.inference
        ),
        dropped_reports=report.dropped_reports,
    )


def telemetry_to_proto(report: TelemetryReport) -> device_pb2.TelemetryReport:
    h = report.health
    message = device_pb2.TelemetryReport(
        at_unix_ms=report.at_ms,
        health=common_pb2.HealthSample(
            cpu_percent=h.cpu_percent,
            memory_used_bytes=h.memory_used_bytes,
            memory_total_bytes=h.memory_total_bytes,
            disk_free_bytes=h.disk_free_bytes,
            temperature_celsius=h.temperature_celsius,
            uptime_seconds=h.uptime_seconds,
        ),
        dropped_reports=report.dropped_reports,
    )
    for s in report.inference:
        stats = message.inference.add(
            target_path=s.target_path,
            count=s.count,
            errors=s.errors,
            latency_bounds_ms=list(s.latency_bounds_ms),
            latency_counts=list(s.latency_counts),
            latency_sum_ms=s.latency_sum_ms,
            latency_max_ms=s.latency_max_ms,
            worker_crashes=s.worker_crashes,
            worker_restarts=s.worker_restarts,
        )
        if s.outputs is not None:
            stats.outputs.top_class_counts.extend(s.outputs.top_class_counts)
            stats.outputs.top_score_counts.extend(s.outputs.top_score_counts)
        if s.shadow is not None:
            stats.shadow.CopyFrom(common_pb2.ShadowStats(**asdict(s.shadow)))
    return message
