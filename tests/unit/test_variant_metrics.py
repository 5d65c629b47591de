"""A variant's measured figures read from the JSON the server stores: the one reader of its keys."""

from __future__ import annotations

from edgefleet.variant_metrics import VariantMetrics

DETAILS = {
    "variant": "int8-weight-only",
    "wire_bytes": 1200,
    "accuracy_delta_points": 0.4,
    "latency_ms": {"ai-edge-litert": 0.05, "tflite-runtime": 0.09},
    "peak_memory_bytes": 9_000_000,
    "peak_memory_bytes_by_runtime": {"ai-edge-litert": 8_000_000},
    "model_memory_bytes": 2_000_000,
    "model_memory_bytes_by_runtime": {"tflite-runtime": 3_000_000},
    "runtimes_ok": ["ai-edge-litert"],
    "excluded": "",
}


def test_figures_are_read_per_runtime_with_the_overall_figure_as_fallback() -> None:
    m = VariantMetrics.from_details(DETAILS, length=5000)
    assert m.wire_bytes == 1200 and m.size_bytes == 5000 and m.points_lost == 0.4
    assert m.memory_on("tflite-runtime") == 3_000_000
    assert m.memory_on("ai-edge-litert") == 2_000_000  # model memory measured overall: not the peak
    assert m.latency_on("tflite-runtime") == 0.09 and m.latency_on("unknown") == 0.0
    assert m.runtimes_ok == ("ai-edge-litert",)


def test_an_older_record_without_model_memory_falls_back_to_the_peak() -> None:
    older = {k: v for k, v in DETAILS.items() if not k.startswith("model_memory")}
    m = VariantMetrics.from_details(older)
    assert m.memory_on("ai-edge-litert") == 8_000_000 and m.memory_on("tflite-runtime") == 9_000_000


def test_an_upload_without_variants_has_defaults_that_never_rule_it_out() -> None:
    m = VariantMetrics.from_details({}, length=777)
    assert m.runtimes_ok is None and m.excluded == "" and m.points_lost == 0.0
    assert m.wire_bytes == 777 and m.memory_on("ai-edge-litert") == 0
