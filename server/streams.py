"""The devices' open control streams in this server process, and what the logic pushes down them.

Each connected device has one bounded queue; the device servicer turns what comes out of it into
protobuf. A push to a device that is not connected, or not reading, is dropped: the device catches up from
its status report when it reconnects, and from its periodic GetAssignment.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from edgefleet.server.storage.records import ModelRecord

QUEUE_LENGTH = 64


@dataclass(frozen=True)
class AssignmentPush:
    model: ModelRecord
    deployment_id: str
    shadow: bool = False  # a staged rollout's shadow wave: load beside the serving model, never serve
    rollout_id: str = ""
    retry: bool = False  # an operator's retry-failed order: the device may lift the model's bad mark once


@dataclass(frozen=True)
class RollbackPush:
    command_id: str
    reason: str
    rollout_id: str = ""  # an aborted rollout's return to the incumbent (the operator's rollout permit)


@dataclass(frozen=True)
class Disconnect:
    reason: str


Push = AssignmentPush | RollbackPush | Disconnect


class ControlStreams:
    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue[Push]] = {}

    def is_connected(self, device_id: str) -> bool:
        return device_id in self._queues

    def connected_count(self) -> int:
        return len(self._queues)

    def attach(self, device_id: str) -> asyncio.Queue[Push]:
        """A new control stream for the device; replaces (and thereby ends) an older one."""
        queue: asyncio.Queue[Push] = asyncio.Queue(maxsize=QUEUE_LENGTH)
        old = self._queues.get(device_id)
        if old is not None:
            old.put_nowait(Disconnect("replaced by a newer connection"))
        self._queues[device_id] = queue
        return queue

    def detach(self, device_id: str, queue: asyncio.Queue[Push]) -> None:
        if self._queues.get(device_id) is queue:
            del self._queues[device_id]

    def push(self, device_id: str, push: Push) -> bool:
        """True when the push was queued for a connected device."""
        queue = self._queues.get(device_id)
        if queue is None:
            return False
        try:
            queue.put_nowait(push)
        except asyncio.QueueFull:
            return False  # the device is not reading; it catches up from its status on reconnect
        return True

    def disconnect(self, device_id: str, reason: str) -> None:
        """Ends the device's stream now, e.g. when its credentials are revoked."""
        queue = self._queues.pop(device_id, None)
        if queue is not None:
            queue.put_nowait(Disconnect(reason))
