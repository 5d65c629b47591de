"""Deployments and rollbacks: which devices a selector names, which variant each gets, what the operator
sees of every rollout, and telling connected devices at once.

    deploy(name, version, selector) -> a variant per device (server.variants) -> one transaction points
    every device at its target -> connected devices get an AssignmentPush; the rest catch up on connect
    rollback(selector) -> each device with a previous model is ordered back to it, from its own copy
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from edgefleet.errors import ConflictError, NotFoundError
from edgefleet.selectors import Selector, parse_selector
from edgefleet.server.repository import Repository
from edgefleet.server.rollouts.claims import claimed, refuse_claimed
from edgefleet.server.rules import (
    ambiguous_name,
    empty_deployment_refusal,
    late_joiner_order,
    pending_action,
    rollback_command_for,
    rollback_destination,
)
from edgefleet.server.storage.interfaces import FleetStore
from edgefleet.server.storage.records import Deployment, DeviceRecord, ModelRecord, now_ms
from edgefleet.server.streams import AssignmentPush, ControlStreams, RollbackPush
from edgefleet.server.variants import choose, choose_target
from edgefleet.values import Capabilities

log = logging.getLogger("edgefleet.server")

OPERATOR_ORDER = "ordered by an operator"
ROLLBACK_ID_PREFIX = "rb-"  # a rollback's id (its record in deployments, and the order devices obey)


@dataclass
class DeploymentStatus:
    deployment: Deployment
    targeted: int = 0
    healthy: int = 0
    failed: int = 0
    pending: int = 0
    superseded: int = 0  # targeted, since taken over by a later deployment or rollback
    notified: int = 0
    unassigned: list[str] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RolloutTag:
    """What a deployment (a wave) or rollback order of a staged rollout tells the device besides its model."""

    rollout_id: str = ""
    shadow: bool = False
    retry: bool = False  # an operator's retry-failed order (`rollouts.orders`): Assignment.retry


NO_TAG = RolloutTag()
ROLLOUT_KIND = "rollout"  # a wave of a staged rollout: the rollout engine, not the selector, says who gets it
ROLLOUT_ROLLBACK_KIND = "rollout-rollback"  # an aborted rollout's order back to the incumbent


@dataclass
class RollbackResult:
    command_id: str
    targeted: int = 0
    notified: int = 0
    skipped: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)  # the ids sent back


async def resolve_selector(store: FleetStore, selector: Selector) -> Selector:
    """`device:X` names a device by id or, failing that, by name: the selector by id. Raises ConflictError
    when the name is shared (listing the ids to use); an unknown X is left as it is (it reaches no device)."""
    if selector.kind != "device":
        return selector
    try:
        await asyncio.to_thread(store.get_device, selector.value)
        return selector
    except NotFoundError:
        pass
    named = await asyncio.to_thread(store.devices_named, selector.value)
    if len(named) > 1:
        raise ConflictError(ambiguous_name(selector.value, [d.id for d in named]))
    return Selector("device", named[0].id) if named else selector


class Deployments:
    def __init__(self, store: FleetStore, streams: ControlStreams, repository: Repository):
        self.store = store
        self.streams = streams
        self.repository = repository
        # deployment or rollback id -> its staged rollout (kept by server.rollouts.engine)
        self.rollout_tags: dict[str, RolloutTag] = {}
        # A deploy checks that no rollout claims its devices and writes under this lock; a rollout start
        # records its claims under it, so neither lands between the other's check and write.
        self.claiming = asyncio.Lock()

    def rollout_tag(self, deployment_id: str) -> RolloutTag:
        return self.rollout_tags.get(deployment_id, NO_TAG)

    async def deploy(
        self,
        name: str,
        version: str,
        selector_text: str,
        variant: str = "",
        *,
        validate_only: bool = False,
        allow_empty: bool = False,
    ) -> DeploymentStatus:
        """Points every device `selector_text` names at its variant of `name` `version` and tells the connected
        ones. `validate_only` answers with the plan and writes nothing (the CLI asks before it signs).
        Raises InvalidRequestError (selector), NotFoundError (model, version, variant) and ConflictError when
        it reaches no device, unless `allow_empty` (a group whose devices enroll later)."""
        selector = await resolve_selector(self.store, parse_selector(selector_text))
        variants = await self.repository.signed_variants(name, version)  # fails early, saying why
        if variant and variant not in {v.variant for v in variants}:
            known = ", ".join(sorted(v.variant for v in variants))
            raise NotFoundError(f"{name} {version} has no signed variant {variant!r}; it has: {known}")
        deployment = Deployment(
            "dep-" + secrets.token_hex(4), name, version, str(selector), now_ms(), variant=variant
        )
        targets: dict[str, str] = {}
        pushes: list[tuple[DeviceRecord, ModelRecord]] = []
        unassigned: list[str] = []
        choices: list[str] = []
        for device in await asyncio.to_thread(self.store.devices_matching, selector):
            chosen, why = choose(
                variants, _capabilities_dict(device.capabilities), list(device.bad_targets), variant
            )
            if chosen is not None:
                targets[device.id] = chosen.target_path
                pushes.append((device, chosen))
                choices.append(f"{device.name} ({device.id}): {chosen.variant}: {why}")
            else:
                unassigned.append(f"{device.name} ({device.id}): {why}")
        if not targets and not allow_empty:
            raise ConflictError(empty_deployment_refusal(str(selector), unassigned))
        rollback_command = rollback_command_for(deployment)
        async with self.claiming:
            busy = await asyncio.to_thread(claimed, self.store.rollouts(), targets)
            what = f"deploying {name} {version} to {selector}"
            refuse_claimed(busy, {d.id: d.name for d, _ in pushes}, what)
            if validate_only:
                return DeploymentStatus(
                    dataclasses.replace(deployment, id=""),
                    targeted=len(targets),
                    pending=len(targets),
                    unassigned=unassigned,
                    choices=choices,
                )
            await asyncio.to_thread(self.store.add_deployment, deployment, targets, rollback_command)
        status = DeploymentStatus(
            deployment, targeted=len(targets), pending=len(targets), unassigned=unassigned, choices=choices
        )
        # What `push_pending` would read back from the database is known here already: two reads per device
        # would make a deployment to 50,000 devices outlast the CLI's wait.
        for device, chosen in pushes:
            if self.streams.is_connected(device.id):
                status.notified += 1
                pointed = dataclasses.replace(
                    device,
                    desired_target=chosen.target_path,
                    desired_deployment=deployment.id,
                    rollback_command=rollback_command,
                )
                await self.push_pending_to(pointed, chosen)
        log.info(
            "deployment %s: %s %s to %s (%d devices)", deployment.id, name, version, selector, len(targets)
        )
        return status

    async def rollback(
        self, selector_text: str, reason: str, *, validate_only: bool = False
    ) -> RollbackResult:
        """Each targeted device goes back to the model it ran before, from its own copy. `validate_only`
        answers with the plan and writes nothing. Raises InvalidRequestError for a bad selector and
        ConflictError when no device would go back (nothing is recorded: an empty rollback would still become
        what the selector was last told, and leave a device joining it later with nothing)."""
        selector = await resolve_selector(self.store, parse_selector(selector_text))
        result = RollbackResult(ROLLBACK_ID_PREFIX + secrets.token_hex(4))
        targets: dict[str, str] = {}
        devices = await asyncio.to_thread(self.store.devices_matching, selector)
        for device in devices:
            why_not = _cannot_go_back(device)
            if why_not or device.previous is None:
                result.skipped.append(f"{device.id}: {why_not}")
                continue
            targets[device.id] = device.previous.target_path
        if not targets:
            raise ConflictError(_empty_rollback_refusal(str(selector), result.skipped))
        if validate_only:
            return dataclasses.replace(result, command_id="", targeted=len(targets))
        # What the selector is sent back to, when that is one version: what a device joining it later gets.
        model_name, version = rollback_destination(
            [device.previous for device in devices if device.previous is not None and device.id in targets]
        )
        deployment = Deployment(
            result.command_id, model_name, version, str(selector), now_ms(), "rollback", reason[:500]
        )
        await asyncio.to_thread(
            self.store.add_deployment, deployment, targets, rollback_command_for(deployment)
        )
        result.targeted, result.devices = len(targets), list(targets)
        for device_id in targets:
            result.notified += self.streams.push(device_id, RollbackPush(result.command_id, reason))
        log.info("rollback %s to %s: %d devices (%s)", result.command_id, selector, len(targets), reason)
        return result

    async def deployment_statuses(self) -> list[DeploymentStatus]:
        deployments = await asyncio.to_thread(self.store.list_deployments)
        counts = await asyncio.to_thread(self.store.deployment_counts)
        statuses = []
        for deployment in deployments:
            found = counts.get(deployment.id)
            status = DeploymentStatus(deployment)
            if found is not None:
                status.healthy, status.failed, status.pending = found.healthy, found.failed, found.pending
            still_pointing = status.healthy + status.failed + status.pending
            status.targeted = max(deployment.devices_targeted, still_pointing)
            status.superseded = status.targeted - still_pointing
            statuses.append(status)
        return statuses

    async def point_new_device(self, device: DeviceRecord) -> None:
        """A device that joins after a rollout started still gets it: what the newest deployment or rollback
        whose selector names it last told that selector (`rules.late_joiner_order`)."""
        deployments = await asyncio.to_thread(self.store.list_deployments)
        deployment = late_joiner_order(
            # A rollout places its late joiners itself; its orders name its devices, not a selector.
            [d for d in deployments if d.kind not in (ROLLOUT_KIND, ROLLOUT_ROLLBACK_KIND)],
            lambda d: parse_selector(d.selector).matches(device.id, device.group, device.labels),
        )
        if deployment is None:
            return
        variants = await self.repository.signed_variants(deployment.model_name, deployment.version)
        target = choose_target(
            variants,
            _capabilities_dict(device.capabilities),
            list(device.bad_targets),
            deployment.variant,
        )
        if target:
            await asyncio.to_thread(self.store.add_deployment_target, deployment.id, device.id, target)

    async def push_pending(self, device_id: str) -> None:
        """Tells a connected device what it should do now, if anything."""
        await self.push_pending_to(await asyncio.to_thread(self.store.get_device, device_id))

    async def push_pending_to(self, device: DeviceRecord, desired: ModelRecord | None = None) -> None:
        """`push_pending` for a record in hand; `desired` is the desired target's model when the caller has
        it (else it is read)."""
        desired_tag = self.rollout_tag(device.desired_deployment)
        action = pending_action(device, retry=desired_tag.retry)
        if action == "rollback":
            tag = self.rollout_tag(device.rollback_command)
            self.streams.push(
                device.id, RollbackPush(device.rollback_command, OPERATOR_ORDER, tag.rollout_id)
            )
        elif action == "assign":
            record = desired or await self.repository.model(device.desired_target)
            tag = desired_tag
            push = AssignmentPush(record, device.desired_deployment, tag.shadow, tag.rollout_id, tag.retry)
            self.streams.push(device.id, push)


def _cannot_go_back(device: DeviceRecord) -> str:
    """Why a rollback skips this device ("" when it can go back). Its "previous model" after a rollback is the
    version it was just sent back from: a second rollback would send it forward again, to what the operator
    wanted gone; a deploy says that on purpose."""
    if device.previous is None:
        return "has no previous model"
    went_back = device.desired_deployment.startswith(ROLLBACK_ID_PREFIX)  # what it was last told: a rollback
    if went_back and device.current_target and device.current_target == device.desired_target:
        return (
            f"already went back ({device.desired_deployment}) from {device.previous.target_path}; to run that "
            "again, deploy it"
        )
    if device.previous.target_path in device.bad_targets:
        return f"its previous model {device.previous.target_path} failed on it"
    return ""


def _empty_rollback_refusal(selector: str, skipped: list[str]) -> str:
    why = f": {'; '.join(skipped[:5])}" if skipped else " (no device matches it)"
    more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
    return f"{selector} reaches no device that can go back{why}{more}; nothing was ordered or recorded"


def _capabilities_dict(capabilities: Capabilities) -> dict[str, Any]:
    """What `server.variants` reads. `Capabilities.to_json` (dataclasses.asdict, a deep copy) would cost a
    large deployment more than all its database work; a flat copy of the fields is the same dict."""
    return {**vars(capabilities), "accelerators": list(capabilities.accelerators)}
