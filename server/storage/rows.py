"""Rows of the SQL tables <-> records. Typed values become JSON columns here and nowhere else: `ModelRef`
through its own `to_json` / `from_json`, `Capabilities` and telemetry through the functions below, which
also read what was stored before typed values (protobuf's JSON form)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from edgefleet.server.storage.records import DeviceRecord
from edgefleet.values import (
    Capabilities,
    HealthSample,
    InferenceStats,
    ModelRef,
    OutputSummary,
    ShadowStats,
    TelemetryReport,
)


def to_device(row: Any, labels: Mapping[str, str] | None = None) -> DeviceRecord:
    """A devices row and the device's labels (rows of device_labels, read apart)."""
    m = row._mapping
    return DeviceRecord(
        id=m["id"],
        name=m["name"],
        group=m["group_name"],
        enrolled_ms=m["enrolled_ms"],
        last_seen_ms=m["last_seen_ms"],
        current=ModelRef.optional(m["current"]),
        previous=ModelRef.optional(m["previous"]),
        desired_target=m["desired_target"],
        desired_deployment=m["desired_deployment"],
        capabilities=capabilities_from_column(m["capabilities"]),
        bad_targets=tuple(m["bad_targets"] or ()),
        last_stage=m["last_stage"],
        last_reason=m["last_reason"],
        rollback_command=m["rollback_command"],
        revoked=m["revoked"],
        status_sequence=m["status_sequence"],
        clock_skew_ms=m["clock_skew_ms"],
        labels=dict(labels or {}),
    )


_CAPABILITY_FIELDS = frozenset(f.name for f in dataclasses.fields(Capabilities))
_NO_CAPABILITIES = Capabilities()


def capabilities_from_column(data: dict[str, Any] | None) -> Capabilities:
    """The column holds what `Capabilities.to_json` wrote (or, before typed values, the same fields from
    protobuf's JSON form, already typed): built directly, since a deployment reads one per device and
    `from_json`'s checks would cost it more than the query."""
    if not data:
        return _NO_CAPABILITIES
    known = {k: v for k, v in data.items() if k in _CAPABILITY_FIELDS}
    known["accelerators"] = tuple(known.get("accelerators", ()))
    return Capabilities(**known)


def device_values(device: DeviceRecord) -> dict[str, Any]:
    return {
        "id": device.id,
        "name": device.name,
        "group_name": device.group,
        "enrolled_ms": device.enrolled_ms,
        "last_seen_ms": device.last_seen_ms,
        "current": device.current.to_json() if device.current else None,
        "previous": device.previous.to_json() if device.previous else None,
        "desired_target": device.desired_target,
        "desired_deployment": device.desired_deployment,
        "capabilities": device.capabilities.to_json(),
        "bad_targets": list(device.bad_targets),
        "last_stage": device.last_stage,
        "last_reason": device.last_reason,
        "rollback_command": device.rollback_command,
        "revoked": device.revoked,
        "status_sequence": device.status_sequence,
        "clock_skew_ms": device.clock_skew_ms,
    }


def telemetry_to_json(report: TelemetryReport) -> dict[str, Any]:
    """The shape the telemetry column has always held (the report's proto fields by name)."""
    health = {k: v for k, v in report.health.__dict__.items() if v is not None}
    inference = [
        {
            **s.__dict__,
            "latency_bounds_ms": list(s.latency_bounds_ms),
            "latency_counts": list(s.latency_counts),
            "outputs": asdict(s.outputs) if s.outputs else None,
            "shadow": asdict(s.shadow) if s.shadow else None,
        }
        for s in report.inference
    ]
    return {
        "at_ms": report.at_ms,
        "health": health,
        "inference": inference,
        "dropped_reports": report.dropped_reports,
    }


def telemetry_from_json(at_ms: int, data: dict[str, Any]) -> TelemetryReport:
    # Rows written before typed values hold protobuf's JSON form: 64-bit integers as strings, defaults left
    # out; the int()/float() conversions read both.
    health = data.get("health") or {}
    temperature = health.get("temperature_celsius")
    return TelemetryReport(
        at_ms=at_ms,
        health=HealthSample(
            cpu_percent=float(health.get("cpu_percent", 0.0)),
            memory_used_bytes=int(health.get("memory_used_bytes", 0)),
            memory_total_bytes=int(health.get("memory_total_bytes", 0)),
            disk_free_bytes=int(health.get("disk_free_bytes", 0)),
            temperature_celsius=float(temperature) if temperature is not None else None,
            uptime_seconds=float(health.get("uptime_seconds", 0.0)),
        ),
        inference=tuple(
            InferenceStats(
                target_path=str(s.get("target_path", "")),
                count=int(s.get("count", 0)),
                errors=int(s.get("errors", 0)),
                latency_bounds_ms=tuple(float(b) for b in s.get("latency_bounds_ms", ())),
                latency_counts=tuple(int(c) for c in s.get("latency_counts", ())),
                latency_sum_ms=float(s.get("latency_sum_ms", 0.0)),
                latency_max_ms=float(s.get("latency_max_ms", 0.0)),
                outputs=_outputs_from_json(s.get("outputs")),
                shadow=_shadow_from_json(s.get("shadow")),
                worker_crashes=int(s.get("worker_crashes", 0)),
                worker_restarts=int(s.get("worker_restarts", 0)),
            )
            for s in data.get("inference") or ()
        ),
        dropped_reports=int(data.get("dropped_reports", 0)),
    )


def _outputs_from_json(data: Any) -> OutputSummary | None:
    if not data:
        return None
    return OutputSummary(
        top_class_counts=tuple(int(c) for c in data.get("top_class_counts", ())),
        top_score_counts=tuple(int(c) for c in data.get("top_score_counts", ())),
    )


def _shadow_from_json(data: Any) -> ShadowStats | None:
    if not data:
        return None
    return ShadowStats(
        candidate_target_path=str(data.get("candidate_target_path", "")),
        compared_calls=int(data.get("compared_calls", 0)),
        top1_agreed=int(data.get("top1_agreed", 0)),
        abs_diff_sum=float(data.get("abs_diff_sum", 0.0)),
        candidate_latency_counts=tuple(int(c) for c in data.get("candidate_latency_counts", ())),
        candidate_errors=int(data.get("candidate_errors", 0)),
        skipped_calls=int(data.get("skipped_calls", 0)),
    )
