"""A shadow candidate: a verified, tested model loaded beside the serving one, run on a sampled share of live
inputs, compared, and never allowed to answer a caller.

    Serving.infer -> the caller's answer (from the serving model) -> `Shadow.offer(inputs, outputs)`:
        sampled (`share`), within the rate limit (a token bucket of `max_per_s`) and the CPU budget (the
        candidate's busy time per wall second over the last window), and only when the one-slot queue is
        empty; anything else counts as skipped. Taking a sample copies the inputs, nothing more.
    the shadow thread -> the candidate's worker (its process at a lower CPU priority) -> top-1 agreement
        and mean |difference| of the first output (dequantized), candidate latency and errors

What bounds the served path's cost is the rate limit and the CPU budget (bench/shadow_cost.py prints them
beside the p99 with and without shadow). `take_stats` empties the counters for one telemetry report.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from edgefleet.agent.outputs import NOT_QUANTIZED, QUANTIZED, Quantization, top_of
from edgefleet.agent.serving import ModelWorker, WorkerGone
from edgefleet.errors import ModelError
from edgefleet.values import LATENCY_BOUNDS_MS, ModelRef, ShadowStats

log = logging.getLogger("edgefleet.agent")

SHADOW_NICENESS = 10  # the candidate's process yields the cores to the serving model
CPU_WINDOW_S = 10.0  # the CPU budget is judged over this much recent wall time


@dataclass(frozen=True)
class ShadowLimits:
    """What a shadow may take from the device (AgentConfig's shadow_* fields)."""

    share: float = 1.0  # of served calls considered for the candidate
    max_per_s: float = 10.0  # candidate calls per second at most
    cpu_budget: float = 0.2  # candidate busy time per wall second, at most (one core = 1.0)
    call_timeout_s: float = 10.0


@dataclass
class _Tally:
    compared: int = 0
    agreed: int = 0
    abs_diff_sum: float = 0.0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))
    errors: int = 0
    skipped: int = 0


def _as_float(output: np.ndarray, quantization: Quantization) -> np.ndarray:
    if quantization.scale > 0 and output.dtype.name in QUANTIZED:
        return (output.astype(np.float32) - quantization.zero_point) * quantization.scale
    return output.astype(np.float32, copy=False)


class Shadow:
    """One candidate in shadow beside the model serving `serving_quantization`d outputs. Thread-safe."""

    def __init__(
        self,
        worker: ModelWorker,
        ref: ModelRef,
        limits: ShadowLimits,
        serving_quantization: Quantization = NOT_QUANTIZED,
    ):
        self.worker = worker
        self.ref = ref
        self.limits = limits
        self.serving_quantization = serving_quantization
        self._lock = threading.Lock()
        self._tally = _Tally()
        self._tokens = 1.0
        self._refilled = time.monotonic()
        self._window_start = self._refilled
        self._window_busy_s = 0.0
        self._queue: queue.Queue[tuple[list[np.ndarray], np.ndarray] | None] = queue.Queue(maxsize=1)
        self._closed = False
        self.reniced = _renice(worker.pid, SHADOW_NICENESS)
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._thread.start()

    # ---- the served path: never waits ------------------------------------------------------------------

    def offer(self, inputs: Sequence[np.ndarray], served: Sequence[np.ndarray]) -> None:
        if self._closed or not served:
            return
        if self.limits.share < 1.0 and random.random() >= self.limits.share:
            return  # not sampled: not counted either
        with self._lock:
            now = time.monotonic()
            rate = self.limits.max_per_s
            self._tokens = min(max(rate, 1.0), self._tokens + (now - self._refilled) * rate)
            self._refilled = now
            if now - self._window_start > CPU_WINDOW_S:
                self._window_start, self._window_busy_s = now, 0.0
            over_cpu = self._window_busy_s > self.limits.cpu_budget * max(now - self._window_start, 1.0)
            if self._tokens < 1.0 or over_cpu or self._queue.full():
                self._tally.skipped += 1
                return
            self._tokens -= 1.0
        try:
            # A copy: the caller owns its arrays once its call returns.
            self._queue.put_nowait(([np.array(a, copy=True) for a in inputs], served[0]))
        except queue.Full:
            with self._lock:
                self._tally.skipped += 1

    # ---- the shadow thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._closed:
                return
            inputs, served = item
            started = time.perf_counter()
            try:
                outputs = self.worker.call(inputs, self.limits.call_timeout_s)
                problem = not outputs or outputs[0].shape != served.shape
            except (WorkerGone, ModelError):
                outputs, problem = [], True
            seconds = time.perf_counter() - started
            with self._lock:
                self._window_busy_s += seconds
                if problem:
                    self._tally.errors += 1
                    continue
                self._compare(served, outputs[0], seconds * 1000)

    def _compare(self, served: np.ndarray, candidate: np.ndarray, ms: float) -> None:
        tally = self._tally
        tally.compared += 1
        tally.latency[bisect.bisect_left(LATENCY_BOUNDS_MS, ms)] += 1
        ours = self.worker.quantization
        tally.agreed += top_of(served, self.serving_quantization)[0] == top_of(candidate, ours)[0]
        diff = float(
            np.mean(np.abs(_as_float(candidate, ours) - _as_float(served, self.serving_quantization)))
        )
        if np.isfinite(diff):
            tally.abs_diff_sum += diff
        else:
            tally.errors += 1  # a NaN answer disagrees, and must not poison the sum
            tally.compared -= 1

    # ---- telemetry and lifetime ------------------------------------------------------------------------

    def take_stats(self) -> ShadowStats:
        with self._lock:
            t, self._tally = self._tally, _Tally()
        return ShadowStats(
            candidate_target_path=self.ref.target_path,
            compared_calls=t.compared,
            top1_agreed=t.agreed,
            abs_diff_sum=t.abs_diff_sum,
            candidate_latency_counts=tuple(t.latency),
            candidate_errors=t.errors,
            skipped_calls=t.skipped,
        )

    def _stop_thread(self) -> None:
        self._closed = True
        with contextlib.suppress(queue.Empty):
            self._queue.get_nowait()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(self.limits.call_timeout_s + 1)

    def stop(self) -> None:
        """Drops the shadow: its worker is killed first, so a sample in progress (even a hung one) ends at
        once (blocking; call it off the event loop)."""
        self._closed = True
        self.worker.kill()
        self._stop_thread()

    def detach(self) -> ModelWorker | None:
        """To serve the candidate: stops comparing and hands over its worker, at the agent's own priority
        again; None when it cannot be (dead, or not allowed to raise the priority back): then it is stopped
        and the caller loads a fresh worker."""
        self._stop_thread()
        if self.worker.alive() and (not self.reniced or _renice(self.worker.pid, 0)):
            return self.worker
        self.worker.retire()
        return None


def _renice(pid: int | None, niceness: int) -> bool:
    """Sets the main thread of process `pid` (where a one-thread interpreter runs) to the agent's own nice
    value plus `niceness`; False when not allowed (raising it back needs CAP_SYS_NICE or RLIMIT_NICE)."""
    if pid is None:
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + niceness))
    except OSError as e:
        log.debug("cannot renice the shadow worker %d: %s", pid, e)
        return False
    return True
