"""The device side of staged rollouts, as pure parts: output summaries, the rollout permit check, install
deferral bounds, the device's time zone and the state file's new fields."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefleet import errors
from edgefleet.agent import decisions
from edgefleet.agent.outputs import OutputTally, Quantization, score_bin, top_of
from edgefleet.agent.state import AgentState
from edgefleet.agent.telemetry import device_timezone
from edgefleet.convert import telemetry_to_proto
from edgefleet.signing import RolloutPermit
from edgefleet.values import (
    LATENCY_BOUNDS_MS,
    MAX_TOP_CLASSES,
    TOP_SCORE_BINS,
    HealthSample,
    InferenceStats,
    ModelRef,
    OutputSummary,
    ShadowStats,
    TelemetryReport,
)


def test_top_class_and_score_of_a_float_classifier() -> None:
    assert top_of(np.array([[0.1, 0.7, 0.2]], np.float32)) == (1, pytest.approx(0.7))


def test_top_of_a_quantized_output_is_dequantized_with_its_scale_and_zero_point() -> None:
    out = np.array([[-128, 127, 0]], np.int8)
    top_class, score = top_of(out, Quantization(1 / 255, -128))
    assert top_class == 1 and score == pytest.approx(1.0)
    assert top_of(np.array([[3, 200]], np.uint8), Quantization(1 / 256, 0)) == (1, pytest.approx(200 / 256))


def test_a_multi_row_output_counts_once_per_call_on_its_last_axis() -> None:
    out = np.zeros((1, 4, 3), np.float32)
    out[0, 2, 1] = 0.9
    assert top_of(out) == (1, pytest.approx(0.9))


def test_scores_are_clipped_into_ten_bins_and_nan_lands_low() -> None:
    assert [score_bin(s) for s in (-3.0, 0.0, 0.05, 0.95, 1.0, 7.0, float("nan"))] == [0, 0, 0, 9, 9, 9, 0]


def test_the_tally_grows_to_the_highest_class_and_caps_it() -> None:
    tally = OutputTally()
    assert tally.summary() is None
    for top_class, score in ((2, 0.31), (0, 0.99), (2, 0.5), (10**6, 0.1)):
        tally.add(top_class, score)
    summary = tally.summary()
    assert summary is not None
    assert len(summary.top_class_counts) == MAX_TOP_CLASSES
    assert summary.top_class_counts[:3] == (1, 0, 2) and summary.top_class_counts[-1] == 1
    assert len(summary.top_score_counts) == TOP_SCORE_BINS and sum(summary.top_score_counts) == 4


PERMITS = {"r1": RolloutPermit("digits", candidate_sequence=3, min_sequence=2)}


def _check(
    rollout: str = "r1", current: tuple[str, int] = ("digits", 3), previous: tuple[str, int] = ("digits", 2)
) -> None:
    decisions.check_rollout_rollback(
        rollout,
        PERMITS,
        current_name=current[0],
        current_sequence=current[1],
        previous_name=previous[0],
        previous_sequence=previous[1],
    )


def test_a_rollout_permit_allows_going_back_from_its_candidate_to_the_incumbent() -> None:
    _check()
    _check(previous=("digits", 5))  # newer than min_sequence: also one of the incumbents


@pytest.mark.parametrize(
    ("rollout", "current", "previous"),
    [
        ("r2", ("digits", 3), ("digits", 2)),  # an order for a rollout nobody signed
        ("r1", ("faces", 3), ("faces", 2)),  # another model
        ("r1", ("digits", 4), ("digits", 3)),  # a version the rollout did not ship
        ("r1", ("digits", 3), ("digits", 1)),  # back past the incumbent
        ("r1", ("digits", 3), ("faces", 2)),  # to another model's version
    ],
)
def test_a_rollout_rollback_outside_its_permit_is_refused(
    rollout: str, current: tuple[str, int], previous: tuple[str, int]
) -> None:
    with pytest.raises(errors.DowngradeRefusedError):
        _check(rollout, current, previous)


def _grant(asked: int, now: int = 1_000_000, until: int = 0, used: int = 0) -> decisions.Deferral:
    return decisions.grant_deferral(
        asked, now, until_ms=until, used_s=used, max_per_request_s=3600, max_total_s=5000
    )


def test_a_deferral_is_bounded_per_request_and_per_assignment() -> None:
    assert _grant(60) == decisions.Deferral(1_000_000 + 60_000, 60, 60)
    assert _grant(10**9).granted_s == 3600
    first = _grant(3600)
    # Asked again at once: only the extension counts against the total, which caps it.
    again = _grant(3600, until=first.until_ms, used=first.used_s)
    assert again.granted_s == 3600 and again.used_s == 3600
    later = _grant(3600, now=1_000_000 + 3_600_000, used=3600)
    assert later.granted_s == 1400 and later.used_s == 5000
    assert _grant(60, used=5000) == decisions.Deferral(0, 0, 5000)


def test_zero_cancels_and_negative_is_refused() -> None:
    assert _grant(0, until=5_000_000, used=100) == decisions.Deferral(0, 0, 100)
    with pytest.raises(errors.InvalidRequestError):
        _grant(-1)


def test_device_timezone_from_tz_file_or_localtime_link(tmp_path: Path) -> None:
    none = tmp_path / "absent"
    assert device_timezone({"TZ": ":Europe/Berlin"}, none, none) == "Europe/Berlin"
    assert device_timezone({"TZ": "/usr/share/zoneinfo/Asia/Tokyo"}, none, none) == "Asia/Tokyo"
    (tmp_path / "timezone").write_text("America/New_York\n")
    assert device_timezone({}, tmp_path / "timezone", none) == "America/New_York"
    (tmp_path / "localtime").symlink_to("/usr/share/zoneinfo/Europe/Paris")
    assert device_timezone({}, none, tmp_path / "localtime") == "Europe/Paris"
    assert device_timezone({"TZ": "UTC"}, none, none) == ""
    assert device_timezone({"TZ": "$(reboot)"}, none, none) == ""
    assert device_timezone({}, none, none) == ""


def test_the_state_file_keeps_its_old_shape_and_round_trips_the_new_fields() -> None:
    assert set(AgentState().to_json()) == {
        "current", "previous", "bad_targets", "pending", "status_sequence", "floors", "rollbacks_done"
    }  # fmt: skip
    ref = ModelRef("digits/2/float32.tflite", "digits", "2", "float32", "a" * 64, 100)
    state = AgentState(shadow=ref, deferred_until_ms=123, deferred_used_s=60)
    assert AgentState.from_json(state.to_json()) == state


def test_output_summaries_and_shadow_stats_stay_within_a_few_kib_per_version_per_report() -> None:
    buckets = tuple([99_999] * (len(LATENCY_BOUNDS_MS) + 1))
    plain = InferenceStats("digits/1/float32.tflite", 10**5, 3, LATENCY_BOUNDS_MS, buckets, 1e6, 100.0)

    def size(stats: InferenceStats) -> int:
        return telemetry_to_proto(TelemetryReport(1, HealthSample(), (stats,))).ByteSize()

    shadow = ShadowStats("digits/2/float32.tflite", 10**4, 9000, 35.0, buckets, 1, 10**5)
    ten = OutputSummary(tuple([99_999] * 10), tuple([99_999] * TOP_SCORE_BINS))
    widest = OutputSummary(tuple([99_999] * MAX_TOP_CLASSES), ten.top_score_counts)
    with_ten = InferenceStats(**{**plain.__dict__, "outputs": ten, "shadow": shadow, "worker_crashes": 1})
    assert size(with_ten) - size(plain) < 200  # a 10-class model: a few dozen counters
    assert size(InferenceStats(**{**with_ten.__dict__, "outputs": widest})) < 4096
