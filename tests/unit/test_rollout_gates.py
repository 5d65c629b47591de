"""Rollout gates: each statistic on known distributions, every gate's verdict and evidence, and the judgement.

A gate must flag a real shift (latency 1.5x slower, two classes swapped, 2 % errors against 0.5 %) and must
pass two samples of one distribution at no more than its false-alarm rate. Those rates are checked over 300
simulated pairs with fixed seeds: the observed rate must stay under alpha + 3 standard deviations of a
Binomial(300, alpha) share (`false_alarm_ceiling`), which a correct test exceeds with probability ~0.1 %.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgefleet.server.rollouts import statistics as st
from edgefleet.server.rollouts.cohorts import (
    LATENCY_BOUNDS_MS,
    CohortTelemetry,
    DeviceWindow,
    FleetColumns,
    InstallOutcomes,
    ShadowAgreement,
    aggregate,
)
from edgefleet.server.rollouts.gates import (
    ErrorRateGate,
    EventRateGate,
    InstallFailureGate,
    LatencyGate,
    OutputDriftGate,
    ShadowAgreementGate,
    default_gates,
    judge,
)
from edgefleet.server.rollouts.verdicts import Outcome

BOUNDS = np.array(LATENCY_BOUNDS_MS)
TRIALS = 300
REPO = Path(__file__).resolve().parents[2]


def false_alarm_ceiling(alpha: float, trials: int = TRIALS) -> float:
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)


def latency_hist(samples_ms: np.ndarray) -> np.ndarray:
    """Bucket latencies as the agent does: bucket k holds (bound[k-1], bound[k]]."""
    return np.bincount(np.searchsorted(BOUNDS, samples_ms, side="left"), minlength=len(BOUNDS) + 1)


def lognormal_ms(rng: np.random.Generator, n: int, median_ms: float = 4.0, sigma: float = 0.5) -> np.ndarray:
    return rng.lognormal(math.log(median_ms), sigma, n)


def cohort(
    latency: np.ndarray | None = None,
    *,
    devices: int = 20,
    calls: int | None = None,
    errors: int = 0,
    **kw: object,
) -> CohortTelemetry:
    counts = tuple(float(v) for v in latency) if latency is not None else ()
    n = calls if calls is not None else int(sum(counts))
    return CohortTelemetry(
        devices=devices, inference_count=n, error_count=errors, latency_counts=counts, **kw
    )  # type: ignore[arg-type]


# --- Mann-Whitney U on histograms -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_test_matches_scipy_on_the_expanded_samples(seed: int) -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    a = latency_hist(lognormal_ms(rng, 700, 4.0 * 1.05))
    b = latency_hist(lognormal_ms(rng, 900))
    ours = st.mann_whitney_greater(a, b)
    x, y = np.repeat(np.arange(a.size), a), np.repeat(np.arange(b.size), b)
    theirs = scipy_stats.mannwhitneyu(x, y, alternative="greater", method="asymptotic")
    assert ours.u == pytest.approx(theirs.statistic, rel=1e-12)
    assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-9)
    assert ours.effect == pytest.approx(theirs.statistic / (x.size * y.size))
    assert (ours.canary_n, ours.control_n) == (700, 900)


def test_rank_effect_is_the_probability_the_canary_is_slower_plus_half_the_ties() -> None:
    assert st.mann_whitney_greater([0, 5], [5, 0]).effect == 1.0
    assert st.mann_whitney_greater([5, 0], [0, 5]).effect == 0.0
    assert st.mann_whitney_greater([2, 2], [2, 2]).effect == 0.5
    # all in one bin: no evidence, not an error
    assert st.mann_whitney_greater([0, 3, 0], [0, 4, 0]).p_value == 1.0


def test_rank_test_flags_a_canary_1_5x_slower() -> None:
    rng = np.random.default_rng(3)
    test = st.mann_whitney_greater(
        latency_hist(lognormal_ms(rng, 2000, 6.0)), latency_hist(lognormal_ms(rng, 2000))
    )
    assert test.p_value < 1e-6 and test.effect > 0.6


def test_rank_test_false_alarms_at_most_alpha_on_one_distribution() -> None:
    rng = np.random.default_rng(4)
    alpha = 0.05
    alarms = sum(
        st.mann_whitney_greater(
            latency_hist(lognormal_ms(rng, 500)), latency_hist(lognormal_ms(rng, 500))
        ).p_value
        < alpha
        for _ in range(TRIALS)
    )
    assert alarms / TRIALS <= false_alarm_ceiling(alpha)


def test_scaled_control_keeps_its_total_and_is_never_faster() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        counts = rng.integers(0, 50, BOUNDS.size + 1).astype(float)
        for factor in (1.0, 1.2, 2.0, 7.5):
            scaled = st.scale_histogram(counts, BOUNDS, factor)
            assert scaled.sum() == pytest.approx(counts.sum())
            assert np.all(scaled >= -1e-9)
            assert np.all(np.cumsum(scaled) <= np.cumsum(counts) + 1e-9)  # mass only moves up
        assert np.allclose(st.scale_histogram(counts, BOUNDS, 1.0), counts)
    with pytest.raises(ValueError):
        st.scale_histogram([1.0] * 13, BOUNDS, 0.9)


def test_scaling_a_uniform_bucket_moves_the_share_above_the_scaled_bound() -> None:
    # 10 calls uniform on (5, 10] ms scaled by 1.25: those above 8 ms (40 %) cross into (10, 25]
    counts = np.zeros(13)
    counts[6] = 10
    scaled = st.scale_histogram(counts, BOUNDS, 1.25)
    assert scaled[6] == pytest.approx(6.0) and scaled[7] == pytest.approx(4.0)


# --- percentiles ----------------------------------------------------------------------------------------


def test_percentiles_interpolate_inside_the_bucket() -> None:
    counts = np.zeros(13)
    counts[3], counts[4] = 50, 50  # (0.5, 1] and (1, 2.5]
    assert st.histogram_quantile(counts, BOUNDS, 0.5) == pytest.approx(1.0)
    assert st.histogram_quantile(counts, BOUNDS, 0.25) == pytest.approx(0.75)
    assert st.histogram_quantile(counts, BOUNDS, 0.95) == pytest.approx(1.0 + 1.5 * 0.9)
    open_ended = np.zeros(13)
    open_ended[-1] = 5
    assert st.histogram_quantile(open_ended, BOUNDS, 0.5) == 1000.0  # "at least 1000 ms"
    with pytest.raises(ValueError):
        st.histogram_quantile(np.zeros(13), BOUNDS, 0.5)


def test_percentiles_of_a_known_distribution_land_in_the_right_bucket() -> None:
    # A histogram knows a percentile only to within its bucket (2-2.5x wide): that much is guaranteed.
    rng = np.random.default_rng(6)
    for median, sigma in ((7.0, 0.6), (1.5, 0.2), (40.0, 1.0)):
        samples = lognormal_ms(rng, 200_000, median, sigma)
        counts = latency_hist(samples)
        for q in (0.5, 0.95):
            estimate, truth = st.histogram_quantile(counts, BOUNDS, q), float(np.quantile(samples, q))
            k = int(np.searchsorted(BOUNDS, truth))
            assert (BOUNDS[k - 1] if k else 0.0) <= estimate <= BOUNDS[k]
    wide = lognormal_ms(rng, 200_000, 20.0, 1.0)  # spread over many buckets: close to the truth
    assert st.histogram_quantile(latency_hist(wide), BOUNDS, 0.5) == pytest.approx(np.median(wide), rel=0.15)


# --- drift ----------------------------------------------------------------------------------------------

CLASS_SHARES = np.array([0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.04, 0.03, 0.02, 0.01])


def test_psi_and_js_of_two_swapped_classes() -> None:
    swapped = CLASS_SHARES[[1, 0, 2, 3, 4, 5, 6, 7, 8, 9]]
    psi = st.population_stability_index(swapped * 10_000, CLASS_SHARES * 10_000)
    # (0.2 - 0.4) ln(0.5) + (0.4 - 0.2) ln 2, less a little for the smoothing
    assert psi == pytest.approx(2 * 0.2 * math.log(2), rel=3e-3)
    assert psi > 0.25
    assert st.population_stability_index(CLASS_SHARES, CLASS_SHARES) == pytest.approx(0.0, abs=1e-12)
    assert st.jensen_shannon_distance(CLASS_SHARES, CLASS_SHARES) == pytest.approx(0.0, abs=1e-7)
    assert st.jensen_shannon_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    assert st.jensen_shannon_distance(swapped, CLASS_SHARES) > 0.1


def test_js_distance_matches_scipy_and_psi_survives_empty_bins() -> None:
    distance = pytest.importorskip("scipy.spatial.distance")
    rng = np.random.default_rng(7)
    for _ in range(20):
        p, q = rng.integers(0, 30, 12), rng.integers(0, 30, 12)
        p[0] = 0
        assert st.jensen_shannon_distance(p, q) == pytest.approx(
            distance.jensenshannon(p, q, base=2), abs=1e-9
        )
        assert math.isfinite(st.population_stability_index(p, q))


def test_drift_gate_flags_swapped_classes_and_passes_one_distribution() -> None:
    rng = np.random.default_rng(8)
    swapped = CLASS_SHARES[[1, 0, 2, 3, 4, 5, 6, 7, 8, 9]]
    for metric in ("psi", "js"):
        gate = OutputDriftGate(metric=metric)
        drifted = gate.evaluate(
            cohort(top_class_counts=tuple(rng.multinomial(5000, swapped))),
            cohort(top_class_counts=tuple(rng.multinomial(5000, CLASS_SHARES))),
        )
        assert drifted.outcome is Outcome.FAIL, drifted.evidence.explanation
        alarms = 0
        for _ in range(TRIALS):
            verdict = gate.evaluate(
                cohort(top_class_counts=tuple(rng.multinomial(3000, CLASS_SHARES))),
                cohort(top_class_counts=tuple(rng.multinomial(3000, CLASS_SHARES))),
            )
            assert verdict.outcome is not Outcome.INCONCLUSIVE
            alarms += verdict.outcome is Outcome.FAIL
        assert alarms == 0  # PSI from noise is ~0.006 here, 40x under the threshold


def test_drift_gate_is_inconclusive_on_few_calls_or_noise_near_the_threshold() -> None:
    small = OutputDriftGate().evaluate(cohort(top_class_counts=(5, 5)), cohort(top_class_counts=(5, 5)))
    assert small.outcome is Outcome.INCONCLUSIVE
    # 200 score bins and 2,000 calls a side: noise alone gives a PSI ~0.2
    rng = np.random.default_rng(9)
    wide = OutputDriftGate(output="top_score").evaluate(
        cohort(top_score_counts=tuple(rng.multinomial(2000, np.full(200, 1 / 200)))),
        cohort(top_score_counts=tuple(rng.multinomial(2000, np.full(200, 1 / 200)))),
    )
    assert wide.outcome is not Outcome.PASS
    assert wide.evidence.figure("expected_from_noise") > 0.125


# --- error rates ----------------------------------------------------------------------------------------


def test_wilson_bounds_match_scipy() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    for k, n in ((0, 50), (3, 100), (97, 100), (500, 1000)):
        ours = st.wilson_bounds(k, n, 0.975)
        theirs = scipy_stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert (ours.lower, ours.upper) == pytest.approx((theirs.low, theirs.high), abs=1e-12)


def test_error_gate_flags_2_percent_against_half_a_percent() -> None:
    rng = np.random.default_rng(10)
    n = 20_000
    verdict = ErrorRateGate().evaluate(
        cohort(calls=n, errors=int(rng.binomial(n, 0.02))),
        cohort(calls=n, errors=int(rng.binomial(n, 0.005))),
    )
    assert verdict.outcome is Outcome.FAIL
    e = verdict.evidence
    assert (e.canary_n, e.control_n, e.sample_unit) == (n, n, "calls")
    assert e.statistic == "error_rate_increase_points" and e.threshold == 0.1 and e.confidence == 0.99
    assert e.bound is not None and 0.1 < e.bound < e.value  # type: ignore[operator]
    assert e.value is not None
    assert e.figure("canary_error_percent") == pytest.approx(e.value + e.figure("control_error_percent"))


def test_error_rate_bound_false_alarms_at_most_alpha_on_one_rate() -> None:
    rng = np.random.default_rng(11)
    alpha, n = 0.05, 4000
    alarms = sum(
        st.rate_increase_lower_bound(rng.binomial(n, 0.005), n, rng.binomial(n, 0.005), n, 1 - alpha) > 0
        for _ in range(TRIALS)
    )
    assert alarms / TRIALS <= false_alarm_ceiling(alpha)
    gate_alarms = sum(
        ErrorRateGate()
        .evaluate(
            cohort(calls=n, errors=int(rng.binomial(n, 0.005))),
            cohort(calls=n, errors=int(rng.binomial(n, 0.005))),
        )
        .outcome
        is Outcome.FAIL
        for _ in range(TRIALS)
    )
    assert gate_alarms / TRIALS <= false_alarm_ceiling(0.01)


def test_error_gate_is_inconclusive_on_tiny_samples_or_few_devices() -> None:
    gate = ErrorRateGate()
    assert gate.evaluate(cohort(calls=50, errors=10), cohort(calls=50)).outcome is Outcome.INCONCLUSIVE
    few = gate.evaluate(cohort(calls=9000, errors=900, devices=2), cohort(calls=9000))
    assert few.outcome is Outcome.INCONCLUSIVE and "devices" in few.evidence.explanation
    assert gate.evaluate(CohortTelemetry(), CohortTelemetry()).outcome is Outcome.INCONCLUSIVE


# --- latency --------------------------------------------------------------------------------------------


def test_latency_gate_fails_a_canary_1_5x_slower_with_its_evidence() -> None:
    rng = np.random.default_rng(12)
    verdict = LatencyGate().evaluate(
        cohort(latency_hist(lognormal_ms(rng, 5000, 6.0))), cohort(latency_hist(lognormal_ms(rng, 5000)))
    )
    assert verdict.outcome is Outcome.FAIL, verdict.evidence.explanation
    e = verdict.evidence
    assert (e.canary_n, e.control_n, e.sample_unit) == (5000, 5000, "calls")
    assert (
        e.statistic == "mann_whitney_effect_vs_control_x1.2" and e.threshold == 20.0 and e.confidence == 0.99
    )
    assert e.p_value is not None and e.p_value < 0.005 and e.value is not None and e.value > 0.5
    assert 1.3 < e.figure("p50_ratio") < 1.7 and e.figure("canary_p95_ms") > e.figure("control_p95_ms")
    assert "slower" in e.explanation and "p50" in e.explanation


def test_latency_gate_passes_a_canary_within_the_band() -> None:
    rng = np.random.default_rng(13)
    for scale in (0.8, 1.0, 1.1):
        verdict = LatencyGate().evaluate(
            cohort(latency_hist(lognormal_ms(rng, 50_000, 4.0 * scale))),
            cohort(latency_hist(lognormal_ms(rng, 50_000))),
        )
        assert verdict.outcome is Outcome.PASS, (scale, verdict.evidence.explanation)


def test_latency_gate_fails_a_slow_tail_the_body_hides() -> None:
    rng = np.random.default_rng(14)
    body = lognormal_ms(rng, 9000)
    tail = lognormal_ms(rng, 1000, 20.0)  # 10 % of calls 5x slower, e.g. a fallback path
    verdict = LatencyGate().evaluate(
        cohort(latency_hist(np.concatenate([body, tail]))), cohort(latency_hist(lognormal_ms(rng, 10_000)))
    )
    assert verdict.outcome is Outcome.FAIL and "tail" in verdict.evidence.explanation
    assert verdict.evidence.bound is not None and verdict.evidence.bound > 0


def test_latency_gate_false_alarms_at_most_alpha_on_one_distribution() -> None:
    rng = np.random.default_rng(15)
    band = LatencyGate()
    plain = LatencyGate(max_slowdown_percent=0.0, confidence=0.95)  # no band: the tests alone
    alarms = {band: 0, plain: 0}
    for _ in range(TRIALS):
        canary, control = (
            cohort(latency_hist(lognormal_ms(rng, 1500))),
            cohort(latency_hist(lognormal_ms(rng, 1500))),
        )
        for gate in alarms:
            alarms[gate] += gate.evaluate(canary, control).outcome is Outcome.FAIL
    assert alarms[plain] / TRIALS <= false_alarm_ceiling(0.05)
    assert alarms[band] / TRIALS <= false_alarm_ceiling(0.01)


def test_latency_gate_is_inconclusive_without_enough_calls() -> None:
    rng = np.random.default_rng(16)
    slow = LatencyGate().evaluate(
        cohort(latency_hist(lognormal_ms(rng, 40, 40.0))), cohort(latency_hist(lognormal_ms(rng, 40)))
    )
    assert slow.outcome is Outcome.INCONCLUSIVE and slow.evidence.canary_n == 40
    assert LatencyGate().evaluate(CohortTelemetry(), CohortTelemetry()).outcome is Outcome.INCONCLUSIVE


def test_shadow_latency_compares_the_candidate_with_the_serving_model_on_the_same_devices() -> None:
    rng = np.random.default_rng(17)
    serving = latency_hist(lognormal_ms(rng, 4000))
    candidate = tuple(float(v) for v in latency_hist(lognormal_ms(rng, 4000, 8.0)))
    canary = cohort(serving, shadow=ShadowAgreement(4000, 3990, 0.01, candidate))
    verdict = LatencyGate(source="shadow").evaluate(canary, CohortTelemetry())
    assert verdict.outcome is Outcome.FAIL


# --- crashes and restarts -------------------------------------------------------------------------------


def test_poisson_comparison_is_the_conditional_binomial_test() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    for c1, t1, c2, t2, ratio in (
        (7, 100.0, 3, 120.0, 1.0),
        (0, 10.0, 4, 10.0, 1.0),
        (12, 50.0, 5, 80.0, 1.5),
    ):
        ours = st.poisson_rate_greater(c1, t1, c2, t2, ratio)
        p0 = ratio * t1 / (ratio * t1 + t2)
        theirs = scipy_stats.binomtest(c1, c1 + c2, p0, alternative="greater").pvalue
        assert ours.p_value == pytest.approx(theirs, rel=1e-9)
    assert st.poisson_rate_greater(0, 5.0, 0, 5.0).p_value == 1.0
    assert math.isinf(st.poisson_rate_greater(3, 5.0, 0, 5.0).rate_ratio)


def test_crash_gate_flags_three_times_the_control_rate_and_passes_one_rate() -> None:
    rng = np.random.default_rng(18)
    gate = EventRateGate()
    hours = 500.0
    failing = gate.evaluate(
        cohort(device_hours=hours, crashes=int(rng.poisson(0.06 * hours))),
        cohort(device_hours=hours, crashes=int(rng.poisson(0.02 * hours))),
    )
    assert failing.outcome is Outcome.FAIL
    assert failing.evidence.sample_unit == "device-hours" and failing.evidence.canary_n == hours
    assert failing.evidence.figure("canary_per_device_hour") > failing.evidence.figure(
        "control_per_device_hour"
    )
    alarms = sum(
        gate.evaluate(
            cohort(device_hours=hours, crashes=int(rng.poisson(0.02 * hours))),
            cohort(device_hours=hours, crashes=int(rng.poisson(0.02 * hours))),
        ).outcome
        is Outcome.FAIL
        for _ in range(TRIALS)
    )
    assert alarms / TRIALS <= false_alarm_ceiling(0.01)


def test_restart_gate_reads_restarts_and_is_inconclusive_on_few_device_hours() -> None:
    gate = EventRateGate(name="worker-restart-rate", event="worker_restarts")
    busy = gate.evaluate(
        cohort(device_hours=100.0, worker_restarts=40), cohort(device_hours=100.0, worker_restarts=5)
    )
    assert busy.outcome is Outcome.FAIL and busy.evidence.statistic == "worker_restarts_rate_ratio"
    short = gate.evaluate(cohort(device_hours=2.0, worker_restarts=9), cohort(device_hours=2.0))
    assert short.outcome is Outcome.INCONCLUSIVE


# --- shadow agreement -----------------------------------------------------------------------------------


def test_shadow_gate_needs_its_lower_bound_over_the_threshold() -> None:
    gate = ShadowAgreementGate()
    assert (
        gate.evaluate(cohort(shadow=ShadowAgreement(5000, 4950)), CohortTelemetry()).outcome is Outcome.PASS
    )
    failing = gate.evaluate(cohort(shadow=ShadowAgreement(5000, 4500)), CohortTelemetry())
    assert (
        failing.outcome is Outcome.FAIL
        and failing.evidence.bound is not None
        and failing.evidence.bound < 0.95
    )
    close = gate.evaluate(cohort(shadow=ShadowAgreement(600, 572)), CohortTelemetry())
    assert close.outcome is Outcome.INCONCLUSIVE
    assert gate.evaluate(cohort(), CohortTelemetry()).outcome is Outcome.INCONCLUSIVE  # no shadow data
    assert (
        gate.evaluate(cohort(shadow=ShadowAgreement(40, 40)), CohortTelemetry()).outcome
        is Outcome.INCONCLUSIVE
    )
    one_device = cohort(shadow=ShadowAgreement(5000, 4990), devices=1)
    assert gate.evaluate(one_device, CohortTelemetry()).outcome is Outcome.INCONCLUSIVE


def test_shadow_gate_passes_a_candidate_under_the_threshold_at_most_alpha_of_the_time() -> None:
    rng = np.random.default_rng(19)
    gate = ShadowAgreementGate()
    passes = sum(
        gate.evaluate(
            cohort(shadow=ShadowAgreement(2000, int(rng.binomial(2000, 0.95)))), CohortTelemetry()
        ).outcome
        is Outcome.PASS
        for _ in range(TRIALS)
    )
    assert passes / TRIALS <= false_alarm_ceiling(0.01)


# --- installs -------------------------------------------------------------------------------------------


def test_one_failure_of_two_is_not_half_a_fleet() -> None:
    verdict = InstallFailureGate().evaluate(
        cohort(installs=InstallOutcomes(succeeded=1, failed=1)), CohortTelemetry()
    )
    assert verdict.outcome is Outcome.INCONCLUSIVE
    assert verdict.evidence.value == 50.0 and verdict.evidence.canary_n == 2


def test_thirty_failures_of_two_hundred_fail_the_wave() -> None:
    verdict = InstallFailureGate().evaluate(
        cohort(installs=InstallOutcomes(succeeded=170, failed=30)), CohortTelemetry()
    )
    assert verdict.outcome is Outcome.FAIL
    e = verdict.evidence
    assert (e.canary_n, e.sample_unit, e.statistic) == (200, "devices", "failed_percent_of_finished")
    assert (e.value, e.threshold, e.figure("failed")) == (15.0, 5.0, 30)


def test_install_gate_passes_a_few_failures_and_fails_most_of_a_small_wave() -> None:
    gate = InstallFailureGate()
    assert (
        gate.evaluate(cohort(installs=InstallOutcomes(198, 2, 10)), CohortTelemetry()).outcome is Outcome.PASS
    )
    assert gate.evaluate(cohort(installs=InstallOutcomes(1, 5)), CohortTelemetry()).outcome is Outcome.FAIL


# --- aggregation and the judgement ----------------------------------------------------------------------


def windows(rng: np.random.Generator, n: int) -> list[DeviceWindow]:
    out = []
    for i in range(n):
        lat = tuple(int(v) for v in latency_hist(lognormal_ms(rng, 200)))
        out.append(
            DeviceWindow(
                device_id=f"d{i}",
                inference_count=200,
                error_count=int(rng.integers(0, 3)),
                latency_counts=lat,
                device_hours=1.5,
                crashes=int(rng.integers(0, 2)),
                worker_restarts=int(rng.integers(0, 2)),
                top_class_counts=tuple(int(v) for v in rng.integers(0, 9, 3 + i % 4)),  # ragged widths
                top_score_counts=tuple(int(v) for v in rng.integers(0, 9, 10)),
                shadow=ShadowAgreement(100, 97, 0.02, lat) if i % 2 else None,
                install=("succeeded", "failed", "pending", "none")[i % 4],
            )
        )
    return out


def test_aggregate_sums_what_a_loop_would() -> None:
    rng = np.random.default_rng(20)
    records = windows(rng, 40)
    columns = FleetColumns.from_windows(records)
    mask = np.arange(40) % 3 == 0
    total = aggregate(columns, mask)
    chosen = [w for w, m in zip(records, mask, strict=True) if m]
    assert total == aggregate(columns, np.flatnonzero(mask))
    assert total.devices == len(chosen)
    assert total.inference_count == sum(w.inference_count for w in chosen)
    assert total.error_count == sum(w.error_count for w in chosen)
    assert total.device_hours == pytest.approx(1.5 * len(chosen))
    assert total.latency_counts == tuple(float(v) for v in np.sum([w.latency_counts for w in chosen], axis=0))
    widest = max(len(w.top_class_counts) for w in records)
    assert len(total.top_class_counts) == widest
    assert total.top_class_counts[0] == sum(w.top_class_counts[0] for w in chosen)
    shadowed = [w.shadow for w in chosen if w.shadow]
    assert total.shadow is not None and total.shadow.compared_calls == 100 * len(shadowed)
    assert total.shadow.mean_abs_diff == pytest.approx(0.02)
    installs = [w.install for w in chosen]
    assert total.installs == InstallOutcomes(
        installs.count("succeeded"), installs.count("failed"), installs.count("pending")
    )
    assert aggregate(columns).devices == 40


def test_judge_fails_on_any_failure_waits_on_any_inconclusive_and_never_passes_by_default() -> None:
    rng = np.random.default_rng(21)
    base = dict(
        devices=50,
        inference_count=50_000,
        error_count=250,
        device_hours=200.0,
        crashes=2,
        top_class_counts=tuple(rng.multinomial(50_000, CLASS_SHARES)),
        top_score_counts=tuple(rng.multinomial(50_000, np.full(10, 0.1))),
        installs=InstallOutcomes(succeeded=50),
    )

    def latency(median_ms: float = 4.0) -> tuple[float, ...]:
        return tuple(float(v) for v in latency_hist(lognormal_ms(rng, 50_000, median_ms)))

    control = CohortTelemetry(latency_counts=latency(), **base)  # type: ignore[arg-type]
    good = CohortTelemetry(latency_counts=latency(), **base)  # type: ignore[arg-type]
    passed = judge(default_gates(), good, control)
    assert passed.outcome is Outcome.PASS, passed.summary()
    assert len(passed.verdicts) == len(default_gates()) and not passed.failed
    slow = CohortTelemetry(latency_counts=latency(8.0), **base)  # type: ignore[arg-type]
    failed = judge(default_gates(), slow, control)
    assert failed.outcome is Outcome.FAIL and [v.gate for v in failed.failed] == ["latency"]
    waiting = judge(default_gates(shadow=True), good, control)  # no shadow data yet
    assert waiting.outcome is Outcome.INCONCLUSIVE
    assert {v.gate for v in waiting.inconclusive} == {"shadow-agreement", "shadow-latency"}
    nothing = judge(default_gates(shadow=True), CohortTelemetry(), CohortTelemetry())
    assert nothing.outcome is Outcome.INCONCLUSIVE and not any(
        v.outcome is Outcome.PASS for v in nothing.verdicts
    )
    assert judge([], good, control).outcome is Outcome.INCONCLUSIVE
    assert "latency: fail" in failed.summary()


def test_every_verdict_carries_its_evidence() -> None:
    rng = np.random.default_rng(22)
    records = windows(rng, 60)
    columns = FleetColumns.from_windows(records)
    half = np.arange(60) < 30
    for verdict in judge(
        default_gates(shadow=True), aggregate(columns, half), aggregate(columns, ~half)
    ).verdicts:
        e = verdict.evidence
        assert e.statistic and e.sample_unit and e.explanation and "\n" not in e.explanation
        assert e.canary_n >= 0 and e.control_n >= 0 and math.isfinite(e.threshold)


def test_bench_quick_runs_and_prints_its_figures() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "rollout_gates.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "1000 devices" in done.stdout
    for row in ("stack", "aggregate", "gates", "from columns", "naive"):
        assert any(
            line.startswith(row) and line.split()[-1].replace(".", "").isdigit()
            for line in done.stdout.splitlines()
        )
