"""The fleet's rules that need no I/O: whether an enrollment token still admits a device, what a rollback
order means for the devices it targets, and what a device should be told to do now. The async logic
(`devices`, `deployments`) reads and writes; these decide.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from edgefleet.server.storage.records import Deployment, DeviceRecord, EnrollmentToken
from edgefleet.values import ModelRef

TOKEN_REFUSED = "enrollment token is unknown, used up or expired; ask for a new one"
TOKEN_USED_UP = "enrollment token is used up; ask for a new one"
CLOCK_SKEW_WARNING_MS = 5 * 60 * 1000


def token_refusal(token: EnrollmentToken | None, now_ms: int) -> str:
    """Why `token` admits no device at `now_ms`, or "" when it admits one. One message for every reason:
    a caller without a valid token learns nothing about which tokens exist."""
    if token is None or token.uses_left <= 0 or token.expires_ms < now_ms:
        return TOKEN_REFUSED
    return ""


def ambiguous_name(name: str, device_ids: list[str]) -> str:
    """Why a device name that several devices share cannot stand for one of them."""
    return f"{len(device_ids)} devices are named {name!r}: use one of their ids ({', '.join(device_ids)})"


def empty_deployment_refusal(selector: str, unassigned: list[str]) -> str:
    """Why a deployment that would reach no device is refused (the operator may pass allow_empty)."""
    why = f": {'; '.join(unassigned[:5])}" if unassigned else " (no device matches it)"
    return (
        f"{selector} reaches no device{why}; check the selector, or allow an empty deployment "
        "(--allow-empty) for devices that enroll later"
    )


def rollback_destination(previous: Sequence[ModelRef]) -> tuple[str, str]:
    """The one (model, version) a rollback sends its devices back to, or ("", "") when they go back to
    different versions (or none): only a single version can be what the selector was told."""
    versions = {(ref.model_name, ref.version) for ref in previous if ref.model_name and ref.version}
    return next(iter(versions)) if len(versions) == 1 else ("", "")


def late_joiner_order(
    deployments: Sequence[Deployment], names_it: Callable[[Deployment], bool]
) -> Deployment | None:
    """What a device enrolling now gets: what its selector was last told, deploy or rollback (`deployments`
    oldest first; `names_it(d)` says whether d's selector names the device). None when nothing, or when the
    last order was a rollback to mixed versions (there is no one version to give)."""
    for deployment in reversed(deployments):
        if names_it(deployment):
            return deployment if deployment.model_name and deployment.version else None
    return None


def certificate_renew_after_ms(not_after_ms: int, lifetime_ms: int) -> int:
    """When a device certificate becomes due for renewal: with a third of the policy's lifetime left, so a
    device that checks daily renews well before expiry and a fleet left alone never expires at once."""
    return not_after_ms - lifetime_ms // 3


def certificate_renewal_due(not_after_ms: int, now_ms: int, lifetime_ms: int) -> bool:
    return now_ms >= certificate_renew_after_ms(not_after_ms, lifetime_ms)


def rollback_command_for(deployment: Deployment) -> str:
    """The pending rollback order a deployment leaves on each device it targets. A rollback order stands
    until the device obeys it or a later deployment replaces it, so a deployment clears it ("")."""
    return deployment.id if deployment.kind == "rollback" else ""


def pending_action(device: DeviceRecord, *, retry: bool = False) -> str:
    """What a device should be told now: "rollback" (an order it has not obeyed), "assign" (its desired
    target, which it does not run and has not refused, or refused but is told to `retry`: a rollout's
    retry-failed order), or "" (nothing)."""
    current = device.current_target
    if device.rollback_command and current != device.desired_target:
        return "rollback"
    if device.desired_target and device.desired_target != current:
        if device.desired_target in device.bad_targets and not retry:
            return ""  # the device already refused it; a new deployment is needed
        return "assign"
    return ""


def pending_rollback(device: DeviceRecord) -> str:
    """The rollback order the device has not obeyed yet, "" when none."""
    return device.rollback_command if device.current_target != device.desired_target else ""
