"""Which order steers a device, so two never pull one device different ways.

- A running or paused rollout claims its members, control cohort included (a control device must stay on
  the incumbent while its wave soaks): another rollout or a plain deploy that would move one is refused
  (`claimed`, `refuse_claimed`). A rollback is never refused: it is the operator's way out.
- A device that enrolls (or starts matching) later is adopted by one rollout at most: the newest running or
  completed one whose selector names it, unless a plain deployment or rollback that names it is newer still
  (`adopter`). Without this every completed rollout would adopt it, each with its own version.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from edgefleet.errors import ConflictError
from edgefleet.selectors import parse_selector
from edgefleet.server.storage.records import Deployment, DeviceRecord
from edgefleet.server.storage.rollout_records import MemberRecord, RolloutRecord, RolloutStore

ACTIVE = ("running", "paused")
ADOPTING = ("running", "completed")
NAMED_IN_REFUSAL = 3


def claimed(rollouts: RolloutStore, device_ids: Iterable[str]) -> dict[str, str]:
    """device id -> the active rollout that has it as a member, for the devices in `device_ids`."""
    wanted = set(device_ids)
    found: dict[str, str] = {}
    for r in rollouts.list_rollouts():
        if r.state in ACTIVE:
            found.update({m.device_id: r.id for m in rollouts.members(r.id) if m.device_id in wanted})
    return found


def refuse_claimed(claims: Mapping[str, str], names: Mapping[str, str], what: str) -> None:
    """Raises ConflictError saying which rollouts hold which of the devices `what` would move."""
    if not claims:
        return
    by_rollout: dict[str, list[str]] = {}
    for device_id, rollout_id in sorted(claims.items()):
        by_rollout.setdefault(rollout_id, []).append(names.get(device_id) or device_id)
    parts = []
    for rollout_id, devices in sorted(by_rollout.items()):
        shown = ", ".join(devices[:NAMED_IN_REFUSAL]) + (" ..." if len(devices) > NAMED_IN_REFUSAL else "")
        parts.append(f"{len(devices)} in rollout {rollout_id} ({shown})")
    first = sorted(by_rollout)[0]
    raise ConflictError(
        f"{what} would move devices that a running rollout steers: {'; '.join(parts)}. Wait for it to finish,"
        f" or stop it first (`edgefleet rollout abort {first}`)"
    )


def newcomers(
    rollout: RolloutRecord, members: Iterable[MemberRecord], devices: Iterable[DeviceRecord]
) -> list[DeviceRecord]:
    """The devices that enrolled after `rollout` started and that its (resolved) selector names, members and
    revoked ones left out. Devices there at the start that the plan left out (a plan short of 100 %, or no
    variant fits them) stay out."""
    known = {m.device_id for m in members}
    wanted = parse_selector(rollout.selector)
    return [
        d
        for d in devices
        if d.enrolled_ms > rollout.created_ms
        and d.id not in known
        and not d.revoked
        and wanted.matches(d.id, d.group, d.labels)
    ]


def adopter(
    device: DeviceRecord, rollouts: Sequence[RolloutRecord], plain_orders: Sequence[Deployment]
) -> str:
    """The id of the rollout that adopts `device` as a late joiner, or "" when none does."""

    def names(selector: str) -> bool:
        return parse_selector(selector).matches(device.id, device.group, device.labels)

    newest = max(
        (r for r in rollouts if r.state in ADOPTING and names(r.selector)),
        key=lambda r: r.created_ms,
        default=None,
    )
    if newest is None:
        return ""
    if any(d.created_ms > newest.created_ms and names(d.selector) for d in plain_orders):
        return ""  # an operator's later deploy or rollback names it: that is what it runs
    return newest.id
