"""The agent's decisions, apart from everything that does them: no I/O, no clock, no asyncio, no grpc.

As python-tuf keeps `TrustedMetadataSet` apart from its updater, the agent's async code (`updates`,
`supervision`) fetches, persists and acts; what it should do is decided here, from plain values:

    may this target run here?          check_compatible     (signed runtimes, hardware classes)
    is it a downgrade, and allowed?    check_not_downgrade  (floors this device ran vs signed rollback floors)
    did the install error doom it?     after_install_error  (the error's `marks_bad` / `retryable`)
    did probation pass?                probation_problem, golden_problem
    restarted too often in probation?  gives_up_at_start    (MAX_STARTS_IN_PROBATION)
    does its worker keep dying?        recent_crashes, crashes_mean_rollback
    may an aborted rollout send it back?  check_rollout_rollback (the operator's signed rollout permit)
    how long may an application defer?   grant_deferral        (per request and per assignment bounds)
    may a retry lift a bad mark?         retry_lift            (once per order, MAX_RETRY_LIFTS per target)

Functions that refuse raise the `edgefleet.errors` class that says why; the others return a value.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgefleet import errors
from edgefleet.signing import RolloutPermit
from edgefleet.values import ModelRef

MAX_STARTS_IN_PROBATION = 3
MAX_WORKER_CRASHES = 3  # within WORKER_CRASH_WINDOW_S: the model is bad, go back to the previous one
WORKER_CRASH_WINDOW_S = 600.0
MAX_BAD_TARGETS = 256  # the newest kept in all: the status report carries them all
MAX_BAD_PER_MODEL = 16  # the newest kept per model: only more failed versions of the same model push one out
MAX_ROLLBACKS_REMEMBERED = 32  # command ids: enough to recognise an order that arrives twice
# An operator's retry-failed may lift one target's bad mark this often on a device, in its whole life: the
# server alone can make a device try a candidate that failed here at most this many more times.
MAX_RETRY_LIFTS = 3


# ---- may this target run here -----------------------------------------------------------------------------


def check_compatible(
    path: str,
    runtimes: Sequence[str],
    hardware_classes: Sequence[str],
    *,
    runtime: str,
    hardware_class: str,
) -> None:
    """Raises IncompatibleError when the target is signed for other runtimes or hardware classes (an empty
    list signs it for all)."""
    if runtimes and runtime not in runtimes:
        raise errors.IncompatibleError(
            f"{path} is signed as correct on {', '.join(runtimes)}, this device runs {runtime}"
        )
    if hardware_classes and hardware_class not in hardware_classes:
        raise errors.IncompatibleError(
            f"{path} is built for {', '.join(hardware_classes)}, "
            f"this device is {hardware_class or 'unclassified'}"
        )


def check_not_downgrade(
    path: str,
    name: str,
    sequence: int,
    *,
    floors: Mapping[str, int],
    rollback_floors: Mapping[str, int],
) -> None:
    """Older than what this device has run (`floors`) needs the operator's signed permission
    (`rollback_floors`, from the verified targets metadata), not the server's word.
    Raises DowngradeRefusedError."""
    floor = floors.get(name, 0)
    if sequence >= floor:
        return
    allowed = rollback_floors.get(name)
    if allowed is None or sequence < allowed:
        raise errors.DowngradeRefusedError(
            f"{path} is older than what this device has run ({name} sequence {sequence} < "
            f"{floor}) and no operator signature allows going back to it"
        )


def raised_floors(floors: Mapping[str, int], name: str, sequence: int) -> dict[str, int]:
    """The floors after installing `name` at `sequence`: a floor never goes down."""
    return {**floors, name: max(floors.get(name, 0), sequence)}


# ---- what an install error means -------------------------------------------------------------------------


class AfterError(enum.Enum):
    MARK_BAD = "mark_bad"  # a property of the signed artifact: never tried again
    REFUSE = "refuse"  # e.g. a downgrade without permission: not retried until the metadata changes
    RETRY = "retry"  # the transport, the metadata for now: back off and try again


def after_install_error(error: errors.EdgefleetError) -> AfterError:
    """Decided by the error's `marks_bad` and `retryable`, never by its class."""
    if error.marks_bad:
        return AfterError.MARK_BAD
    if not error.retryable:
        return AfterError.REFUSE
    return AfterError.RETRY


def reports_retry(error: errors.EdgefleetError) -> bool:
    """Retried trouble worth an event (once per kind): refused or expired metadata, bytes that do not hash
    (a tampered blob, a spliced resume), a target nobody signed. A plain transport failure is only logged;
    the server already knows its own outages."""
    return isinstance(error, (errors.MetadataError, errors.HashMismatchError, errors.UnsignedTargetError))


def model_of(target_path: str) -> str:
    """The model a signed target path belongs to ("digits/2/float32.tflite" -> "digits")."""
    return target_path.split("/", 1)[0]


def with_bad_target(bad_targets: Sequence[str], path: str) -> list[str]:
    """`bad_targets` with `path` added once (as the newest). Only a signed target whose verified bytes failed
    (golden, tensor contract, a crash or hang, a probation) is ever added (`after_install_error`, the
    supervisor): a server naming targets nobody signed adds nothing. Bounded per model (the newest
    MAX_BAD_PER_MODEL of each), so one model's failures never push another model's bad version out, and in
    all (MAX_BAD_TARGETS)."""
    marked = list(bad_targets) if path in bad_targets else [*bad_targets, path]
    kept: list[str] = []
    per_model: dict[str, int] = {}
    for entry in reversed(marked):  # newest first
        model = model_of(entry)
        if per_model.get(model, 0) < MAX_BAD_PER_MODEL:
            per_model[model] = per_model.get(model, 0) + 1
            kept.append(entry)
    return list(reversed(kept))[-MAX_BAD_TARGETS:]


def with_rollback_done(done: Sequence[str], command_id: str) -> list[str]:
    return [*done[-(MAX_ROLLBACKS_REMEMBERED - 1) :], command_id]


# ---- probation --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Totals:
    """Inferences on one target since the agent started: (calls, failures) from `Serving.totals`."""

    calls: int = 0
    failures: int = 0

    def since(self, before: Totals) -> Totals:
        return Totals(self.calls - before.calls, self.failures - before.failures)


def probation_problem(before: Totals, now: Totals, *, worker_alive: bool) -> str:
    """Why the candidate fails its probation so far ("" when nothing is wrong yet): an inference failed, or
    its worker process died. Checked often, so a failing model goes back within a fraction of a second."""
    during = now.since(before)
    if during.failures:
        return f"{during.failures} of {during.calls} inferences failed during probation"
    if not worker_alive:
        return "its worker process died during probation"
    return ""


def golden_problem(error: str | None) -> str:
    """At the end of probation the signed golden input runs again; `error` is why it failed, if it did."""
    return f"golden check after activation failed: {error}" if error is not None else ""


def healthy_reason(before: Totals, now: Totals) -> str:
    return f"{now.since(before).calls} inferences, 0 failed"


def previous_after_activation(
    current: ModelRef | None, previous: ModelRef | None, new_path: str
) -> ModelRef | None:
    """Which model stays the previous one once `new_path` runs: the one running now, unless it is `new_path`
    itself (a lost copy re-installed), which keeps the real previous."""
    if current is not None and current.target_path == new_path:
        return previous
    return current


# ---- restarts and crashes ----------------------------------------------------------------------------------


def gives_up_at_start(starts: int) -> bool:
    """A pending update whose probation the agent has now started `starts` times: once past
    MAX_STARTS_IN_PROBATION the new model keeps taking the agent down, so go back to the previous one."""
    return starts > MAX_STARTS_IN_PROBATION


def recent_crashes(
    crashes: Sequence[float], now: float, window_s: float = WORKER_CRASH_WINDOW_S
) -> list[float]:
    """The crash times (monotonic seconds) still inside the window, with this one (`now`) added."""
    return [t for t in crashes if now - t < window_s] + [now]


def crashes_mean_rollback(crash_count: int, has_previous: bool) -> bool:
    """A worker that died MAX_WORKER_CRASHES times in the window means a bad model, when there is a previous
    one to go back to; otherwise it is restarted again."""
    return crash_count >= MAX_WORKER_CRASHES and has_previous


# ---- rollout-scoped rollback -------------------------------------------------------------------------------


def check_rollout_rollback(
    rollout_id: str,
    permits: Mapping[str, RolloutPermit],
    *,
    current_name: str,
    current_sequence: int,
    previous_name: str,
    previous_sequence: int,
) -> None:
    """An order naming rollout `rollout_id` sends this device back only when the operator signed a permit for
    that rollout (`permits`, from the verified targets metadata) and the device runs the permit's model at its
    candidate sequence, with a previous version of that model at `min_sequence` or newer. Nothing else: not
    another rollout's order, not another model, not an older incumbent. Raises DowngradeRefusedError."""
    permit = permits.get(rollout_id)
    if permit is None:
        raise errors.DowngradeRefusedError(
            f"no operator signature permits going back for rollout {rollout_id!r}"
        )
    if current_name != permit.model or current_sequence != permit.candidate_sequence:
        raise errors.DowngradeRefusedError(
            f"rollout {rollout_id!r} permits going back from {permit.model} sequence "
            f"{permit.candidate_sequence}; this device runs {current_name} sequence {current_sequence}"
        )
    if previous_name != permit.model or previous_sequence < permit.min_sequence:
        raise errors.DowngradeRefusedError(
            f"rollout {rollout_id!r} permits going back to {permit.model} sequence {permit.min_sequence} "
            f"or newer; the previous model here is {previous_name} sequence {previous_sequence}"
        )


# ---- install deferral ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deferral:
    until_ms: int  # 0 = not deferred
    granted_s: int
    used_s: int  # granted since the last install started


def grant_deferral(
    asked_s: int,
    now_ms: int,
    *,
    until_ms: int,
    used_s: int,
    max_per_request_s: int,
    max_total_s: int,
) -> Deferral:
    """An application asks that no install start for `asked_s` seconds from now (0 cancels). Granted at most
    `max_per_request_s`, and at most what is left of `max_total_s` for the assignment waiting (`used_s` so
    far): an application cannot hold an update off for good. A deferral already running is replaced, and
    only the seconds that extend it count. Raises InvalidRequestError for a negative request."""
    if asked_s < 0:
        raise errors.InvalidRequestError("seconds must be 0 (cancel) or more")
    if asked_s == 0:
        return Deferral(0, 0, used_s)
    left_ms = max(0, until_ms - now_ms)
    wanted_s = min(asked_s, max_per_request_s)
    extra_s = max(0, min(wanted_s - left_ms // 1000, max_total_s - used_s))
    granted_s = min(wanted_s, left_ms // 1000 + extra_s)
    if granted_s <= 0:
        return Deferral(until_ms if left_ms else 0, 0, used_s)
    return Deferral(now_ms + granted_s * 1000, granted_s, used_s + extra_s)


# ---- retry-failed -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryLift:
    lift: bool  # take `target` off the bad list and install it as usual
    why: str  # what to log ("" when there is nothing to say: not a retry, or the target is not bad)


def retry_lift(
    target: str, order_id: str, *, retry: bool, bad_targets: Sequence[str], lifted_for: Sequence[str]
) -> RetryLift:
    """An assignment of `target` under `order_id`, marked `retry` (a rollout's retry-failed order). The bad
    mark is lifted once per order (the same order arrives on the stream and in every periodic check) and at
    most MAX_RETRY_LIFTS times per target (`lifted_for`: the orders that lifted it before, kept in the state
    file). Without retry, or for a target that is not bad, nothing changes."""
    if not retry or target not in bad_targets:
        return RetryLift(False, "")
    if not order_id:
        return RetryLift(False, f"a retry of {target} names no order: it stays listed as bad")
    if order_id in lifted_for:
        return RetryLift(False, f"{target} was retried for {order_id} already: it stays listed as bad")
    if len(lifted_for) >= MAX_RETRY_LIFTS:
        return RetryLift(
            False,
            f"not retrying {target} for {order_id}: retries lifted its bad mark {len(lifted_for)} times "
            f"already (at most {MAX_RETRY_LIFTS}); it stays listed as bad",
        )
    return RetryLift(
        True,
        f"retrying {target}, which failed here before: the operator's retry-failed order {order_id} lifts "
        f"its bad mark (lift {len(lifted_for) + 1} of at most {MAX_RETRY_LIFTS})",
    )
