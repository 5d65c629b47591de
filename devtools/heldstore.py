"""A fleet store whose write of chosen orders waits, as a slow disk makes it wait, until a condition the
test sets is true (or a time limit passes): how a test forces one interleaving of two requests.

    held = HeldStore(fleet.deployments.store, lambda d: d.kind == "deploy", lambda: rollout_exists())
    fleet.deployments.store = held     # everything else goes to the real store
    ...; held.waiting.wait(); ...; assert held.crossed.is_set()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from edgefleet.server.storage.interfaces import FleetStore
from edgefleet.server.storage.records import Deployment


class HeldStore:
    """`store`, except that `add_deployment` of an order `holds` picks waits until `ready()` (at most
    `limit_s`). `waiting` is set once a write waits; `crossed` once `ready()` came true while one waited
    (`ready_at_once`: it was true when the write came, so the test forced nothing)."""

    def __init__(
        self,
        store: FleetStore,
        holds: Callable[[Deployment], bool],
        ready: Callable[[], bool],
        limit_s: float = 20.0,
    ):
        self._store, self._holds, self._ready, self._limit_s = store, holds, ready, limit_s
        self.waiting = threading.Event()
        self.ready_at_once = threading.Event()
        self.crossed = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def add_deployment(
        self, deployment: Deployment, targets: dict[str, str], rollback_command: str = ""
    ) -> None:
        if self._holds(deployment):  # called in a worker thread: the server's loop runs on meanwhile
            self.waiting.set()
            if self._ready():
                self.ready_at_once.set()  # the other request had landed already: nothing crossed
            deadline = time.monotonic() + self._limit_s
            while not self._ready() and time.monotonic() < deadline:
                time.sleep(0.02)
            if self._ready() and not self.ready_at_once.is_set():
                self.crossed.set()
        self._store.add_deployment(deployment, targets, rollback_command)
