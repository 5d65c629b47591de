"""The fleet's rules that need no I/O: whether an enrollment token still admits a device, what a rollback
order means for the devices it targets, and what a device should be told to do now. The async logic
(`devices`, `deployments`) reads and writes; these decide.
"""

from __future__ import annotations

from edgefleet.server.storage.records import Deployment, DeviceRecord, EnrollmentToken

TOKEN_REFUSED = "enrollment token is unknown, used up or expired; ask for a new one"
TOKEN_USED_UP = "enrollment token is used up; ask for a new one"
CLOCK_SKEW_WARNING_MS = 5 * 60 * 1000


def token_refusal(token: EnrollmentToken | None, now_ms: int) -> str:
    """Why `token` admits no device at `now_ms`, or "" when it admits one. One message for every reason:
    a caller without a valid token learns nothing about which tokens exist."""
    if token is None or token.uses_left <= 0 or token.expires_ms < now_ms:
        return TOKEN_REFUSED
    return ""


def rollback_command_for(deployment: Deployment) -> str:
    """The pending rollback order a deployment leaves on each device it targets. A rollback order stands
    until the device obeys it or a later deployment replaces it, so a deployment clears it ("")."""
    return deployment.id if deployment.kind == "rollback" else ""


def pending_action(device: DeviceRecord) -> str:
    """What a device should be told now: "rollback" (an order it has not obeyed), "assign" (its desired
    target, which it does not run and has not refused), or "" (nothing)."""
    current = device.current_target
    if device.rollback_command and current != device.desired_target:
        return "rollback"
    if device.desired_target and device.desired_target != current:
        if device.desired_target in device.bad_targets:
            return ""  # the device already refused it; a new deployment is needed
        return "assign"
    return ""


def pending_rollback(device: DeviceRecord) -> str:
    """The rollback order the device has not obeyed yet, "" when none."""
    return device.rollback_command if device.current_target != device.desired_target else ""
