"""Typed values <-> protobuf: round trips, and the refusals a service relies on before it trusts a peer."""

from __future__ import annotations

import json
import math

import pytest

from edgefleet import convert
from edgefleet.errors import InvalidRequestError
from edgefleet.server.storage import rows
from edgefleet.v1 import common_pb2, device_pb2
from edgefleet.values import (
    STAGES,
    Capabilities,
    DeviceStatus,
    InferenceStats,
    ModelRef,
    OutputSummary,
    ShadowStats,
    TelemetryReport,
    UpdateEvent,
)


def test_every_update_stage_of_the_proto_has_a_name_and_back() -> None:
    names = {convert.stage_name(v) for v in common_pb2.UpdateStage.values()} - {""}
    assert names == set(STAGES)
    for stage in STAGES:
        assert convert.stage_name(convert.stage_value(stage)) == stage


def test_model_ref_round_trips_through_proto_and_json() -> None:
    ref = ModelRef("digits/2/float32.tflite", "digits", "2", "float32", "ab" * 32, 1234)
    assert convert.ref_from_proto(convert.ref_to_proto(ref)) == ref
    assert ModelRef.from_json(ref.to_json()) == ref
    assert convert.ref_from_proto(common_pb2.ModelRef()) is None
    assert ModelRef.optional(None) is None and ModelRef.optional({}) is None


@pytest.mark.parametrize("bad", [[], "x", {"target_path": ""}, {"target_path": "a", "length": "many"}])
def test_malformed_model_ref_json_is_refused(bad: object) -> None:
    with pytest.raises(InvalidRequestError):
        ModelRef.from_json(bad)


def test_status_round_trips_and_capabilities_are_optional() -> None:
    caps = Capabilities(runtime="ai-edge-litert", cpu_count=2, accelerators=("xnnpack",))
    status = DeviceStatus(ModelRef("m/1/float32.tflite"), None, caps, "0.1.0", ("m/0/float32.tflite",), 1, 7)
    assert convert.status_from_proto(convert.status_to_proto(status)) == status
    without = DeviceStatus(None, None, None, sequence=3)
    assert convert.status_from_proto(convert.status_to_proto(without)).capabilities is None


@pytest.mark.parametrize(
    "caps",
    [
        common_pb2.Capabilities(cpu_count=-1),
        common_pb2.Capabilities(memory_available_bytes=-5),
        common_pb2.Capabilities(latency_budget_ms=math.nan),
        common_pb2.Capabilities(runtime="r" * 129),
        common_pb2.Capabilities(accelerators=["a"] * 33),
    ],
)
def test_absurd_capabilities_are_refused(caps: common_pb2.Capabilities) -> None:
    with pytest.raises(InvalidRequestError):
        convert.capabilities_from_proto(caps)


def test_events_with_unknown_stages_or_absurd_times_are_refused() -> None:
    with pytest.raises(InvalidRequestError):
        convert.event_from_proto(device_pb2.UpdateEvent(target_path="m/1/a.tflite", stage=99))
    with pytest.raises(InvalidRequestError):
        convert.event_from_proto(
            device_pb2.UpdateEvent(target_path="m/1/a.tflite", stage=5, at_unix_ms=2**62)
        )
    event = UpdateEvent("m/1/a.tflite", "healthy", "ok", 10, "rb-1")
    assert convert.event_from_proto(convert.event_to_proto(event)) == event


def test_telemetry_with_nan_or_negative_counts_is_refused() -> None:
    report = device_pb2.TelemetryReport(at_unix_ms=1)
    report.inference.add(target_path="m/1/a.tflite", count=-1)
    with pytest.raises(InvalidRequestError):
        convert.telemetry_from_proto(report)
    report = device_pb2.TelemetryReport(at_unix_ms=1)
    report.health.cpu_percent = math.inf
    with pytest.raises(InvalidRequestError):
        convert.telemetry_from_proto(report)
    good = device_pb2.TelemetryReport(at_unix_ms=1, dropped_reports=2)
    good.inference.add(target_path="m/1/a.tflite", count=3, latency_bounds_ms=[1.0], latency_counts=[2, 1])
    typed = convert.telemetry_from_proto(good)
    assert convert.telemetry_from_proto(convert.telemetry_to_proto(typed)) == typed
    assert typed.inference[0].latency_counts == (2, 1) and typed.dropped_reports == 2


def test_output_summaries_shadow_stats_and_worker_counters_survive_the_wire_and_the_telemetry_column() -> (
    None
):
    report = TelemetryReport(
        at_ms=1_700_000_000_000,
        inference=(
            InferenceStats(
                "digits/1/float32.tflite",
                count=3,
                latency_bounds_ms=(1.0,),
                latency_counts=(1, 2),
                outputs=OutputSummary((1, 2), (0,) * 9 + (3,)),
                shadow=ShadowStats("digits/2/float32.tflite", 2, 1, 0.5, (1, 1), 1, 4),
                worker_crashes=1,
                worker_restarts=2,
            ),
        ),
    )
    assert convert.telemetry_from_proto(convert.telemetry_to_proto(report)) == report
    stored = json.loads(json.dumps(rows.telemetry_to_json(report)))
    assert rows.telemetry_from_json(report.at_ms, stored) == report
