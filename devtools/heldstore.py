"""A fleet store one of whose writes waits, as a slow disk makes it wait, until a condition the test sets is
true (or a time limit passes): how a test forces one interleaving of two requests.

    held = HeldStore(fleet.deployments.store, "add_deployment", lambda d, *_: d.kind == "deploy",
                     ready=lambda: rollout_exists())
    fleet.deployments.store = held     # everything else goes to the real store
    ...; held.waiting.wait(); ...; assert held.crossed.is_set()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from edgefleet.server.storage.interfaces import FleetStore


class HeldStore:
    """`store`, except that the first call of `method` that `holds(*args)` picks waits until `ready()`
    (at most `limit_s`): before the write, or with `after` once it is done (holding the writer's next
    step). `waiting` is set once a call waits; `crossed` once `ready()` came true while it waited
    (`ready_at_once`: it was true already, so the test forced nothing)."""

    def __init__(
        self,
        store: FleetStore,
        method: str,
        holds: Callable[..., bool],
        ready: Callable[[], bool],
        limit_s: float = 20.0,
        *,
        after: bool = False,
    ):
        self._store, self._method, self._holds, self._ready = store, method, holds, ready
        self._limit_s, self._after = limit_s, after
        self.waiting = threading.Event()
        self.ready_at_once = threading.Event()
        self.crossed = threading.Event()

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._store, name)
        if name != self._method:
            return real

        def held(*args: Any, **kwargs: Any) -> Any:
            if self.waiting.is_set() or not self._holds(*args, **kwargs):
                return real(*args, **kwargs)  # only the first call it picks waits
            if not self._after:
                self._wait()
            result = real(*args, **kwargs)
            if self._after:
                self._wait()
            return result

        return held

    def _wait(self) -> None:  # in the writer's worker thread: the server's loop runs on meanwhile
        self.waiting.set()
        if self._ready():
            self.ready_at_once.set()
        deadline = time.monotonic() + self._limit_s
        while not self._ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._ready() and not self.ready_at_once.is_set():
            self.crossed.set()
