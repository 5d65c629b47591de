"""Figures of a simulated fleet: percentiles, the busiest window, how a fleet came back after a restart,
and the simulation's own noise (its event loop's stalls, garbage collection kept out of the way)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from edgefleet.devtools.background import BackgroundLoop
from edgefleet.devtools.serverprocess import ServerProcess
from edgefleet.devtools.simdevices import AGENT_BACKOFF_INITIAL_S, SimDevice


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def busiest_window(times: Sequence[float], window: float) -> int:
    """The most events in any window of `window` seconds."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(ordered):
        while t - ordered[start] > window:
            start += 1
        best = max(best, end - start + 1)
    return best


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """Moves every object that exists to the permanent generation. One process simulating hundreds of
    devices must not stall all of them at once in a full collection (a real device has a process of its
    own): without this, a gen-2 collection of ~0.8 s with 2,000 devices fires all their backoff timers
    together afterwards, a burst the devices would never make."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class LoopLag(BackgroundLoop):
    """The longest this process's event loop was late for a 10 ms tick: the simulation's own stalls."""

    def __init__(self) -> None:
        self.max = 0.0

    async def _run(self) -> None:
        while True:
            asked = time.monotonic()
            await asyncio.sleep(0.01)
            self.max = max(self.max, time.monotonic() - asked - 0.01)


async def status_times(server: ServerProcess) -> dict[str, float]:
    """When the server last processed each device's status (`last_seen`), on this process's monotonic clock."""
    offset = time.time() - time.monotonic()
    return {d.id: d.last_seen_unix_ms / 1000 - offset for d in await server.devices()}


@dataclass
class RestartFigures:
    """How a fleet came back after a server restart (times in s)."""

    ready_after: float  # SIGTERM -> the new process serves
    cuts: list[float]  # SIGTERM -> each device's stream ended
    first_retries: list[float]  # each device's stream end -> its first try to reconnect
    tries: list[int]  # tries per device from its stream's end until it was back
    tries_bound: list[int]  # the most an exponential backoff allows in that time
    backs: list[float]  # ready -> the device received the assignment on its new stream
    arrivals: list[float]  # ready -> the new server processed the device's status
    codes: collections.Counter[str]  # how the failed tries ended

    @classmethod
    def of(
        cls,
        devices: Sequence[SimDevice],
        deployment_id: str,
        stopped: float,
        ready: float,
        seen: dict[str, float],
    ) -> RestartFigures:
        r = cls(ready - stopped, [], [], [], [], [], [], collections.Counter())
        for d in devices:
            ends = [(t, code) for t, code, _ in d.ends if t >= stopped]
            assert ends, d.id
            cut = ends[0][0]
            back = d.first_assignment(deployment_id, cut)
            assert back is not None, d.id
            tries = [t for t in d.attempts if cut < t <= back]
            r.cuts.append(cut - stopped)
            r.first_retries.append(tries[0] - cut)
            r.tries.append(len(tries))
            # Backoff delays are at least 0.25 s * 2^k (initial 0.5 s, jitter x0.5..1.5), so k tries take
            # at least 0.25 * (2^k - 1) s.
            r.tries_bound.append(math.floor(math.log2((back - cut) / (AGENT_BACKOFF_INITIAL_S / 2) + 1)) + 1)
            r.backs.append(back - ready)
            r.arrivals.append(seen[d.id] - ready)
            r.codes.update(code.name for t, code in ends if t < back)
        return r

    def __str__(self) -> str:
        def spread(values: Sequence[float]) -> str:
            return (
                " / ".join(f"{percentile(values, q):.2f}" for q in (10, 50, 90)) + f" / {max(values):.2f} s"
            )

        n = len(self.cuts)
        return (
            f"{n} streams cut {min(self.cuts):.2f} .. {max(self.cuts):.2f} s after SIGTERM; new server ready "
            f"{self.ready_after:.2f} s after it\n"
            f"first retry after the cut p10 / p50 / p90 / max: {spread(self.first_retries)}\n"
            f"statuses processed by the new server, after ready: {spread(self.arrivals)}; busiest 100 ms "
            f"{busiest_window(self.arrivals, 0.1)}, busiest 1 s {busiest_window(self.arrivals, 1.0)} devices\n"
            f"assignment received again, after ready: {spread(self.backs)}\n"
            f"tries per device: {dict(sorted(collections.Counter(self.tries).items()))}; failed tries ended "
            f"{dict(self.codes)}"
        )
