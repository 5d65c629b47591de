"""Unit tests of the agent's pure decisions (`edgefleet.agent.decisions`): no server, no process, no loop."""

from __future__ import annotations

import pytest

from edgefleet import errors
from edgefleet.agent import decisions
from edgefleet.agent.decisions import AfterError, Totals
from edgefleet.values import ModelRef

# ---- compatibility ----------------------------------------------------------------------------------------


def test_target_signed_for_no_runtime_or_hardware_class_runs_anywhere() -> None:
    decisions.check_compatible("m/1/a.tflite", (), (), runtime="tflite-runtime", hardware_class="")


def test_target_signed_for_this_runtime_and_class_is_compatible() -> None:
    decisions.check_compatible(
        "m/1/a.tflite",
        ("ai-edge-litert", "tflite-runtime"),
        ("pi4",),
        runtime="tflite-runtime",
        hardware_class="pi4",
    )


def test_target_signed_for_another_runtime_is_incompatible() -> None:
    with pytest.raises(errors.IncompatibleError, match="signed as correct on ai-edge-litert"):
        decisions.check_compatible(
            "m/1/a.tflite", ("ai-edge-litert",), (), runtime="tflite-runtime", hardware_class=""
        )


def test_target_built_for_another_hardware_class_is_incompatible_even_unclassified() -> None:
    with pytest.raises(errors.IncompatibleError, match="this device is pi4"):
        decisions.check_compatible("m/1/a.tflite", (), ("jetson",), runtime="x", hardware_class="pi4")
    with pytest.raises(errors.IncompatibleError, match="unclassified"):
        decisions.check_compatible("m/1/a.tflite", (), ("jetson",), runtime="x", hardware_class="")


def test_incompatible_is_refused_from_its_signed_fields_and_never_listed_as_bad() -> None:
    """Decided anew from what is signed each time it is assigned: a server assigning many signed variants for
    other hardware must not push a version that really failed off the bounded list of bad ones."""
    with pytest.raises(errors.IncompatibleError) as caught:
        decisions.check_compatible("m/1/a.tflite", ("a",), (), runtime="b", hardware_class="")
    assert decisions.after_install_error(caught.value) is AfterError.REFUSE


# ---- downgrades --------------------------------------------------------------------------------------------


def test_newer_or_same_version_is_no_downgrade() -> None:
    for sequence in (3, 4):
        decisions.check_not_downgrade("m/x", "m", sequence, floors={"m": 3}, rollback_floors={})


def test_first_version_of_a_model_never_seen_is_no_downgrade() -> None:
    decisions.check_not_downgrade("other/1", "other", 1, floors={"m": 9}, rollback_floors={})


def test_server_pushing_an_older_version_without_operator_signature_is_refused() -> None:
    with pytest.raises(errors.DowngradeRefusedError, match="sequence 2 < 3"):
        decisions.check_not_downgrade("m/2/a.tflite", "m", 2, floors={"m": 3}, rollback_floors={})


def test_downgrade_below_the_signed_rollback_floor_is_refused() -> None:
    with pytest.raises(errors.DowngradeRefusedError):
        decisions.check_not_downgrade("m/1/a.tflite", "m", 1, floors={"m": 3}, rollback_floors={"m": 2})


def test_downgrade_the_operator_signed_for_is_allowed() -> None:
    decisions.check_not_downgrade("m/2/a.tflite", "m", 2, floors={"m": 3}, rollback_floors={"m": 2})
    decisions.check_not_downgrade("m/2/a.tflite", "m", 2, floors={"m": 3}, rollback_floors={"m": 1})


def test_rollback_floor_for_another_model_allows_nothing_here() -> None:
    with pytest.raises(errors.DowngradeRefusedError):
        decisions.check_not_downgrade("m/2/a.tflite", "m", 2, floors={"m": 3}, rollback_floors={"n": 0})


def test_refused_downgrade_is_not_marked_bad_and_not_retried_until_the_metadata_changes() -> None:
    error = errors.DowngradeRefusedError("older")
    assert decisions.after_install_error(error) is AfterError.REFUSE


def test_floors_never_go_down() -> None:
    assert decisions.raised_floors({"m": 5, "n": 1}, "m", 3) == {"m": 5, "n": 1}
    assert decisions.raised_floors({"m": 5}, "m", 7) == {"m": 7}
    assert decisions.raised_floors({}, "m", 0) == {"m": 0}


def test_raised_floors_leaves_the_given_floors_alone() -> None:
    floors = {"m": 1}
    decisions.raised_floors(floors, "m", 4)
    assert floors == {"m": 1}


# ---- what an install error means ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (errors.HashMismatchError("bytes differ"), AfterError.RETRY),
        (errors.ModelError("wrong golden output"), AfterError.MARK_BAD),
        (errors.SignatureError("signed fields malformed"), AfterError.MARK_BAD),
        (errors.UnsignedTargetError("no such target"), AfterError.RETRY),
        (errors.IncompatibleError("other runtime"), AfterError.REFUSE),  # from signed fields, every time
        (errors.DowngradeRefusedError("older"), AfterError.REFUSE),
        (errors.AccessDeniedError("no"), AfterError.REFUSE),
        (errors.TransportError("server down"), AfterError.RETRY),
        (errors.MetadataExpiredError("expired"), AfterError.RETRY),
        (errors.MetadataRefusedError("rolled back metadata"), AfterError.RETRY),
    ],
)
def test_install_error_is_decided_by_marks_bad_and_retryable(
    error: errors.EdgefleetError, expected: AfterError
) -> None:
    assert decisions.after_install_error(error) is expected


def test_an_error_both_retryable_and_marking_bad_is_marked_bad() -> None:
    class Both(errors.EdgefleetError):
        retryable = True
        marks_bad = True

    assert decisions.after_install_error(Both("x")) is AfterError.MARK_BAD


def test_only_metadata_trouble_is_reported_while_retrying() -> None:
    assert decisions.reports_retry(errors.MetadataExpiredError("expired"))
    assert decisions.reports_retry(errors.MetadataRefusedError("refused"))
    assert not decisions.reports_retry(errors.TransportError("down"))
    assert decisions.reports_retry(errors.HashMismatchError("tampered blob"))
    assert decisions.reports_retry(errors.UnsignedTargetError("nobody signed it"))


def test_bytes_that_do_not_hash_or_an_unsigned_target_never_mark_a_version_bad() -> None:
    """A compromised server or network can send wrong bytes or name fake targets; neither may blacklist."""
    for error in (errors.HashMismatchError("x"), errors.UnsignedTargetError("y")):
        assert error.retryable and not error.marks_bad


def test_bad_target_is_added_once_and_the_list_stays_bounded() -> None:
    assert decisions.with_bad_target(["a/1/f.tflite"], "b/1/f.tflite") == ["a/1/f.tflite", "b/1/f.tflite"]
    assert decisions.with_bad_target(["a/1/f", "b/1/f"], "a/1/f") == ["a/1/f", "b/1/f"]
    many = [f"t{i}/1/f.tflite" for i in range(decisions.MAX_BAD_TARGETS)]
    marked = decisions.with_bad_target(many, "new/1/f.tflite")
    assert len(marked) == decisions.MAX_BAD_TARGETS and marked[-1] == "new/1/f.tflite"
    assert "t0/1/f.tflite" not in marked


def test_failures_of_other_models_or_other_versions_never_push_one_models_bad_version_out() -> None:
    """Bounded per model: only MAX_BAD_PER_MODEL newer failed versions of the same model replace an entry;
    any number of another model's never do."""
    bad = ["digits/2/float32.tflite"]
    for i in range(1000):
        bad = decisions.with_bad_target(bad, f"other/{i}/float32.tflite")
    assert "digits/2/float32.tflite" in bad
    assert len([b for b in bad if b.startswith("other/")]) == decisions.MAX_BAD_PER_MODEL
    for i in range(3, 3 + decisions.MAX_BAD_PER_MODEL - 1):
        bad = decisions.with_bad_target(bad, f"digits/{i}/float32.tflite")
    assert "digits/2/float32.tflite" in bad
    bad = decisions.with_bad_target(bad, "digits/99/float32.tflite")
    assert "digits/2/float32.tflite" not in bad  # the operator signed 16 newer versions that failed here


def test_rollback_orders_remembered_are_bounded_newest_kept() -> None:
    done = [f"c{i}" for i in range(40)]
    remembered = decisions.with_rollback_done(done, "new")
    assert len(remembered) == decisions.MAX_ROLLBACKS_REMEMBERED
    assert remembered[-1] == "new" and remembered[0] == "c9"
    assert decisions.with_rollback_done([], "c") == ["c"]


# ---- probation ----------------------------------------------------------------------------------------------


def test_probation_with_clean_inferences_and_a_live_worker_has_no_problem() -> None:
    assert decisions.probation_problem(Totals(10, 2), Totals(50, 2), worker_alive=True) == ""


def test_failed_inference_during_probation_fails_it_counting_only_since_activation() -> None:
    problem = decisions.probation_problem(Totals(10, 2), Totals(14, 3), worker_alive=True)
    assert problem == "1 of 4 inferences failed during probation"


def test_worker_dying_during_probation_fails_it() -> None:
    problem = decisions.probation_problem(Totals(), Totals(5, 0), worker_alive=False)
    assert problem == "its worker process died during probation"


def test_failed_inferences_are_reported_before_a_dead_worker() -> None:
    problem = decisions.probation_problem(Totals(), Totals(3, 3), worker_alive=False)
    assert problem.startswith("3 of 3 inferences failed")


def test_golden_check_after_activation_decides_the_end_of_probation() -> None:
    assert decisions.golden_problem(None) == ""
    assert (
        decisions.golden_problem("outputs differ") == "golden check after activation failed: outputs differ"
    )


def test_healthy_reason_counts_inferences_since_activation() -> None:
    assert decisions.healthy_reason(Totals(7, 1), Totals(19, 1)) == "12 inferences, 0 failed"


def test_totals_since() -> None:
    assert Totals(9, 4).since(Totals(2, 1)) == Totals(7, 3)


def test_activation_keeps_the_running_model_as_previous() -> None:
    v1, v0 = ModelRef("m/1/a.tflite"), ModelRef("m/0/a.tflite")
    assert decisions.previous_after_activation(v1, v0, "m/2/a.tflite") == v1


def test_reinstalling_the_running_model_keeps_the_real_previous() -> None:
    v1, v0 = ModelRef("m/1/a.tflite"), ModelRef("m/0/a.tflite")
    assert decisions.previous_after_activation(v1, v0, "m/1/a.tflite") == v0


def test_first_activation_has_no_previous() -> None:
    assert decisions.previous_after_activation(None, None, "m/1/a.tflite") is None


# ---- restarts and crashes -----------------------------------------------------------------------------------


def test_model_that_keeps_killing_the_agent_during_probation_is_given_up_after_max_starts() -> None:
    limit = decisions.MAX_STARTS_IN_PROBATION
    assert not any(decisions.gives_up_at_start(n) for n in range(1, limit + 1))
    assert decisions.gives_up_at_start(limit + 1)


def test_crashes_outside_the_window_are_forgotten() -> None:
    window = decisions.WORKER_CRASH_WINDOW_S
    crashes = decisions.recent_crashes([0.0, 10.0, window + 5.0], now=window + 20.0)
    assert crashes == [window + 5.0, window + 20.0]


def test_first_crash_is_recorded() -> None:
    assert decisions.recent_crashes([], now=3.0) == [3.0]


def test_worker_dying_repeatedly_in_the_window_means_rollback_when_there_is_a_previous_model() -> None:
    limit = decisions.MAX_WORKER_CRASHES
    assert not decisions.crashes_mean_rollback(limit - 1, has_previous=True)
    assert decisions.crashes_mean_rollback(limit, has_previous=True)
    assert decisions.crashes_mean_rollback(limit + 5, has_previous=True)


def test_worker_dying_repeatedly_without_a_previous_model_is_restarted_again() -> None:
    assert not decisions.crashes_mean_rollback(decisions.MAX_WORKER_CRASHES + 1, has_previous=False)


def test_crash_loop_in_the_window_reaches_rollback_after_max_crashes() -> None:
    crashes: list[float] = []
    verdicts = []
    for second in range(decisions.MAX_WORKER_CRASHES):
        crashes = decisions.recent_crashes(crashes, now=float(second))
        verdicts.append(decisions.crashes_mean_rollback(len(crashes), has_previous=True))
    assert verdicts == [False] * (decisions.MAX_WORKER_CRASHES - 1) + [True]


# ---- retry-failed -----------------------------------------------------------------------------------------

BAD = "m/2/a.tflite"


def _lift(
    order: str = "ro-ab12-w0-retry1",
    *,
    retry: bool = True,
    bad: tuple[str, ...] = (BAD,),
    lifted: tuple[str, ...] = (),
) -> decisions.RetryLift:
    return decisions.retry_lift(BAD, order, retry=retry, bad_targets=bad, lifted_for=lifted)


def test_a_retry_lifts_a_bad_mark_once_per_order() -> None:
    first = _lift()
    assert first.lift and "ro-ab12-w0-retry1" in first.why and "1 of at most 3" in first.why
    again = _lift(lifted=("ro-ab12-w0-retry1",))  # the same order again (stream, then periodic check)
    assert not again.lift and "already" in again.why
    assert _lift("ro-ab12-w0-retry2", lifted=("ro-ab12-w0-retry1",)).lift  # a new order may


def test_a_target_is_lifted_at_most_max_retry_lifts_times() -> None:
    lifted = tuple(f"ro-ab12-w0-retry{i}" for i in range(1, decisions.MAX_RETRY_LIFTS + 1))
    assert _lift("ro-new1-w0-retry1", lifted=lifted[:-1]).lift
    beyond = _lift("ro-new1-w0-retry1", lifted=lifted)
    assert not beyond.lift and "3 times already" in beyond.why


def test_without_retry_or_for_a_target_that_is_not_bad_nothing_changes() -> None:
    assert _lift(retry=False) == decisions.RetryLift(False, "")
    assert _lift(bad=("m/3/a.tflite",)) == decisions.RetryLift(False, "")
    assert _lift("", bad=(BAD,)).lift is False  # a retry that names no order lifts nothing
