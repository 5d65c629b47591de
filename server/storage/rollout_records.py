"""What a staged rollout keeps, and the `RolloutStore` interface that keeps it.

A rollout, its waves (each with the plan's size, whether it runs in shadow, its state and its last
judgement), its members (per device: which wave, canary or control, the update state with timestamps) and
its timeline. Gate samples are not stored twice: they are summed, when a wave is judged, from the telemetry
rows the FleetStore already keeps durably (`telemetry_since`), so a restart loses none.

`FleetStore.rollouts()` returns the RolloutStore that shares the fleet store's database.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet.values import TelemetryReport

ROLLOUT_STATES = ("running", "paused", "completed", "aborted")
WAVE_STATES = ("pending", "soaking", "holding", "passed", "promoted", "failed", "aborted")
MEMBER_STATES = (
    "pending",
    "downloading",
    "verified",
    "activated",
    "healthy",
    "failed",
    "rolled_back",
    "deferred",
    "shadow_ready",
)


@dataclass
class RolloutRecord:
    id: str
    name: str
    model_name: str
    version: str
    selector: str
    created_ms: int
    actor: str
    settings_json: str  # rollouts.settings.RolloutSettings.to_json
    state: str = "running"
    current_wave: int = 0
    reason: str = ""  # why it stopped (the failed gate and its numbers, or the operator's word)
    updated_ms: int = 0
    finished_ms: int = 0
    rollback_id: str = ""  # the rollback order an abort sent, "" = none


@dataclass
class WaveRecord:
    rollout_id: str
    index: int
    shadow: bool
    size: int  # cumulative devices the rollout reaches with this wave
    state: str = "pending"
    deployment_id: str = ""
    started_ms: int = 0
    judged_ms: int = 0
    outcome: str = ""  # the last judgement: pass / fail / inconclusive, "" = not judged yet
    judgement_json: str = "[]"  # the last judgement's verdicts with their evidence


@dataclass
class MemberRecord:
    rollout_id: str
    device_id: str
    wave_index: int
    role: str  # "canary" (the wave's devices) or "control" (stays on the incumbent while it soaks)
    state: str = "pending"
    target_path: str = ""  # the candidate variant the device was given, "" = not assigned yet
    assigned_ms: int = 0
    updated_ms: int = 0
    healthy_ms: int = 0
    # An operator's retry-failed order the member is assigned again under ("" = the wave's deployment): its
    # device may lift the candidate's bad mark for it (Assignment.retry).
    retry_order: str = ""


@dataclass
class TimelineEntry:
    rollout_id: str
    at_ms: int
    what: str
    details_json: str = "{}"


class RolloutStore(abc.ABC):
    """Rollouts, waves, members and timeline; every method one transaction. TransportError when the
    database is unavailable; ConflictError / NotFoundError where named."""

    @abc.abstractmethod
    def add_rollout(
        self, rollout: RolloutRecord, waves: Sequence[WaveRecord], members: Sequence[MemberRecord]
    ) -> None:
        """Raises ConflictError when the id exists already."""

    @abc.abstractmethod
    def get_rollout(self, rollout_id: str) -> RolloutRecord:
        """Raises NotFoundError."""

    @abc.abstractmethod
    def list_rollouts(self) -> list[RolloutRecord]:
        """Oldest first."""

    @abc.abstractmethod
    def update_rollout(self, rollout_id: str, **values: Any) -> None: ...

    @abc.abstractmethod
    def waves(self, rollout_id: str) -> list[WaveRecord]:
        """By index."""

    @abc.abstractmethod
    def update_wave(self, rollout_id: str, index: int, **values: Any) -> None: ...

    @abc.abstractmethod
    def members(self, rollout_id: str) -> list[MemberRecord]: ...

    @abc.abstractmethod
    def add_members(self, members: Sequence[MemberRecord]) -> None:
        """Members not there yet (a late joiner); one already there is left as it is."""

    @abc.abstractmethod
    def update_members(self, rollout_id: str, changes: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        """(device id, role, column values) per member, in one transaction."""

    @abc.abstractmethod
    def add_timeline(self, entries: Sequence[TimelineEntry]) -> None: ...

    @abc.abstractmethod
    def timeline(self, rollout_id: str) -> list[TimelineEntry]:
        """Oldest first."""

    @abc.abstractmethod
    def telemetry_since(self, device_ids: Sequence[str], since_ms: int) -> dict[str, list[TelemetryReport]]:
        """Each device's telemetry reports at or after `since_ms`, oldest first."""
