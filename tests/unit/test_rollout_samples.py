"""Gate samples from stored telemetry: which stats count for the canary, the control and a shadow wave, and
a wave judged from them (pure: server.rollouts.samples and .evaluate)."""

from __future__ import annotations

from edgefleet.server.rollouts import evaluate
from edgefleet.server.rollouts.samples import device_window
from edgefleet.server.rollouts.settings import build_gates
from edgefleet.server.storage.rollout_records import MemberRecord
from edgefleet.values import LATENCY_BOUNDS_MS, InferenceStats, OutputSummary, ShadowStats, TelemetryReport

V1, V2 = "m/1/float32.tflite", "m/2/float32.tflite"
BUCKETS = len(LATENCY_BOUNDS_MS) + 1


def stats(
    target: str, calls: int, *, bucket: int = 5, top: int = 0, shadow: ShadowStats | None = None
) -> InferenceStats:
    latency = [0] * BUCKETS
    latency[bucket] = calls
    classes = [0] * 10
    classes[top] = calls
    return InferenceStats(
        target,
        count=calls,
        errors=0,
        latency_bounds_ms=LATENCY_BOUNDS_MS,
        latency_counts=tuple(latency),
        outputs=OutputSummary(tuple(classes), tuple([calls] + [0] * 9)),
        shadow=shadow,
        worker_crashes=1,
    )


def test_a_window_sums_only_the_chosen_version_and_spans_its_reports() -> None:
    reports = [TelemetryReport(t, inference=(stats(V1, 10), stats(V2, 100))) for t in (0, 60_000, 120_000)]
    w = device_window("d", reports, counts=lambda s: s.target_path == V2)
    assert (w.inference_count, w.crashes, w.top_class_counts[0]) == (300, 3, 300)
    assert abs(w.device_hours - 180_000 / 3_600_000) < 1e-9  # 3 reports over 2 minutes: 3 minutes covered


def test_a_shadow_window_takes_the_serving_stats_that_compare_the_candidate() -> None:
    shadow = ShadowStats(
        V2, compared_calls=50, top1_agreed=45, abs_diff_sum=5.0, candidate_latency_counts=(1,) * BUCKETS
    )
    reports = [TelemetryReport(t, inference=(stats(V1, 100, shadow=shadow),)) for t in (0, 10_000)]
    w = device_window("d", reports, counts=lambda s: False, shadow_of=V2)
    assert w.shadow is not None
    assert (w.shadow.compared_calls, w.shadow.top1_agreed, w.shadow.mean_abs_diff) == (100, 90, 0.1)
    assert w.inference_count == 200  # the serving model's calls: the shadow latency gate's baseline
    assert device_window("d", reports, counts=lambda s: False, shadow_of="m/3/float32.tflite").shadow is None


def test_a_wave_that_answers_another_class_fails_on_drift_and_passes_without_it() -> None:
    canary = [MemberRecord("ro-x", f"c{i}", 0, "canary", "healthy", V2) for i in range(10)]
    control = [MemberRecord("ro-x", f"k{i}", 0, "control") for i in range(10)]

    def telemetry(top: int) -> dict[str, list[TelemetryReport]]:
        found = {}
        for m in canary:
            found[m.device_id] = [
                TelemetryReport(t, inference=(stats(V2, 500, top=top),)) for t in (0, 10_000)
            ]
        for m in control:
            found[m.device_id] = [TelemetryReport(t, inference=(stats(V1, 500),)) for t in (0, 10_000)]
        return found

    gates = [g for g in build_gates([], shadow=False) if g.name in ("install-failures", "drift-top-class")]
    same = evaluate.judge_wave(gates, canary, control, telemetry(0), False)
    assert same.outcome.value == "pass", same.summary()
    drifted = evaluate.judge_wave(gates, canary, control, telemetry(3), False)
    assert [v.gate for v in drifted.failed] == ["drift-top-class"]
    assert "drift-top-class" in evaluate.failed_line(drifted)
    assert '"outcome": "fail"' in evaluate.judgement_json(drifted)
