"""Serving inference with hot swaps that drop nothing.

Each model version runs in its own worker process (`ModelWorker`). Why a process and not a thread:
`Interpreter.allocate_tensors()` holds the GIL (7-25 ms for a 30 MB model), so loading a candidate in the
serving process would stall every caller; and a model that crashes or hangs the interpreter must not take
the agent down. The candidate is loaded, checked and warmed in its own process beside the running one;
the swap is one reference assignment; the old worker finishes the call it is serving and is then retired.

`Serving.infer` is the in-process Python API (thread-safe); the local gRPC service calls it too.
"""

from __future__ import annotations

import bisect
import multiprocessing.connection
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.reduction import send_handle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.agent import worker_stderr
from edgefleet.agent.outputs import OutputTally, Quantization, top_of
from edgefleet.agent.sealed_model import SealedModel
from edgefleet.errors import EdgefleetError, InvalidRequestError, ModelError
from edgefleet.modelinfo import ModelSignature
from edgefleet.values import LATENCY_BOUNDS_MS, ModelRef

if TYPE_CHECKING:
    from edgefleet.agent.shadow import Shadow


class WorkerGone(EdgefleetError):
    """The worker was retired (a swap) or died; the caller retries on the active one."""


class ModelWorker:
    """One model version in a child process.

    `spawn` starts the process, which imports the runtime while the agent does other work (a download);
    `load` then gives it the model. A Python process start costs ~200 ms of CPU, so doing it early keeps
    that cost away from the moment of the swap. `start` does both. `load` and `start` raise ModelError when
    the model does not load in time or the process dies."""

    def __init__(
        self,
        model_path: Path | None,
        runtime: str,
        *,
        num_threads: int = 1,
        memory_limit_bytes: int = 0,
        low_priority: bool = False,
    ):
        self.model_path = Path(model_path) if model_path else None
        self.runtime = runtime
        self._num_threads = num_threads
        self._memory_limit = memory_limit_bytes
        # Load (import, model, warm-up) at a lower CPU priority than the process that serves: for a
        # candidate loading beside an active model on the same cores (edgefleet.agent.worker).
        self._low_priority = low_priority
        self.lock = threading.Lock()  # one request at a time through the socket
        self.closed = False
        self.signature: ModelSignature | None = None
        self.warm_outputs: list[np.ndarray] | None = None  # of the warm-up inputs given to `load`
        self.warm_error: str | None = None  # why those inputs failed, when they did
        self.quantization = Quantization()  # of the first output, for output summaries
        self._process: Any = None
        self._conn: multiprocessing.connection.Connection | None = None

    def spawn(self) -> ModelWorker:
        # A fresh interpreter via exec, not fork (the agent runs gRPC threads) and not multiprocessing's
        # spawn (it re-imports the embedding application's __main__).
        parent, child = socket.socketpair()
        args = [
            str(child.fileno()),
            self.runtime,
            str(self._num_threads),
            str(self._memory_limit),
            str(int(self._low_priority)),
        ]
        self._process = subprocess.Popen(
            # faulthandler: a runtime that crashes the worker leaves "Fatal Python error: ..." on its stderr.
            [sys.executable, "-X", "faulthandler", "-m", "edgefleet.agent.worker", *args],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,  # into the agent's log, the runtimes' routine lines at DEBUG (worker_stderr)
            env={
                **os.environ,
                # numpy's BLAS would start threads the worker never uses (it does no algebra), and each
                # thread's malloc arena reserves address space that counts against the memory limit.
                "OPENBLAS_NUM_THREADS": "1",
                "MALLOC_ARENA_MAX": "2",
            },
        )
        child.close()
        worker_stderr.follow(self._process.stderr, self._process.pid)
        self._conn = multiprocessing.connection.Connection(parent.detach())
        return self

    def load(
        self,
        model: SealedModel | Path,
        timeout: float = 30.0,
        warm_inputs: Sequence[np.ndarray] | None = None,
    ) -> ModelSignature:
        """Loads the model from the sealed bytes (the agent passes bytes it checked against the signed target;
        a path, for tools and tests, is read into sealed bytes first, unchecked). With `warm_inputs` also
        runs them once, as part of the load (their outputs land in `warm_outputs`, or the reason they failed
        in `warm_error`)."""
        if not isinstance(model, SealedModel):
            self.model_path = Path(model)
            with SealedModel.read(self.model_path) as sealed:
                return self.load(sealed, timeout, warm_inputs)
        if self._process is None:
            self.spawn()
        assert self._conn is not None
        try:
            self._conn.send(None if warm_inputs is None else list(warm_inputs))
            # The worker gets its own copy of the sealed descriptor (SCM_RIGHTS), never a path to a file.
            send_handle(self._conn, model.fd, self._process.pid)
        except OSError as e:
            self.kill()
            raise ModelError(f"model worker died before loading (exit code {self._exit_code()})") from e
        reply = self._receive(timeout, "load")
        if reply[0] != "ready":
            self.kill()
            raise ModelError(f"model does not load: {reply[1]}")
        self.signature = ModelSignature.from_json(reply[1])
        self.warm_outputs, self.warm_error = reply[2], reply[3]
        if len(reply) > 4:
            self.quantization = Quantization(*reply[4])
        return self.signature

    def start(self, timeout: float = 30.0) -> ModelSignature:
        """For tools and tests: loads `model_path`, unchecked (the agent loads checked bytes with `load`)."""
        assert self.model_path is not None
        return self.load(self.model_path, timeout)

    def _exit_code(self) -> int | None:
        if self._process is None:
            return None
        try:
            code: int | None = self._process.wait(timeout=1)  # reap it: a signal shows as -N
        except subprocess.TimeoutExpired:
            code = None
        return code

    def _receive(self, timeout: float, what: str) -> tuple[Any, ...]:
        assert self._conn is not None
        try:
            if not self._conn.poll(timeout):
                self.kill()
                raise ModelError(
                    f"model {what} did not finish within {timeout:.0f} s; the worker was stopped"
                )
            reply: tuple[Any, ...] = self._conn.recv()
            return reply
        except (EOFError, OSError, ConnectionResetError) as e:
            code = self._exit_code()
            self.kill()
            raise ModelError(f"model worker died during {what} (exit code {code})") from e

    def call(self, inputs: Sequence[np.ndarray], timeout: float) -> list[np.ndarray]:
        """Raises WorkerGone when retired or dead, ModelError when the model fails on these inputs."""
        with self.lock:
            if self.closed or self._conn is None:
                raise WorkerGone("worker retired")
            try:
                self._conn.send(list(inputs))
            except (OSError, BrokenPipeError) as e:
                self.kill()
                raise WorkerGone("worker died") from e
            status, payload = self._receive(timeout, "inference")
            if status != "ok":
                raise ModelError(str(payload))
            outputs: list[np.ndarray] = payload
            return outputs

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def alive(self) -> bool:
        return bool(self._process is not None and self._process.poll() is None and not self.closed)

    def retire(self) -> None:
        """Waits for the call in progress, then stops the worker. A kill, not a polite exit: the worker has
        nothing to flush, and a Python shutdown costs 50-120 ms of CPU that callers would feel."""
        with self.lock:
            # Callers queued behind the call in progress see `closed` and go to the new worker at once,
            # instead of waiting for the kill below.
            self.closed = True
        self.kill()

    def kill(self) -> None:
        self.closed = True
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=5)
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@dataclass
class VersionStats:
    count: int = 0
    errors: int = 0
    latency_sum_ms: float = 0.0
    latency_max_ms: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))
    outputs: OutputTally = field(default_factory=OutputTally)
    worker_crashes: int = 0  # unexpected deaths of this version's worker (never a swap's retirement)
    worker_restarts: int = 0

    def add(self, ms: float, ok: bool) -> None:
        self.count += 1
        self.errors += not ok
        self.latency_sum_ms += ms
        self.latency_max_ms = max(self.latency_max_ms, ms)
        self.buckets[bisect.bisect_left(LATENCY_BOUNDS_MS, ms)] += 1


@dataclass(frozen=True)
class Result:
    outputs: list[np.ndarray]
    target_path: str
    version: str
    output_names: tuple[str, ...]  # of the model that ran, taken with it (not re-read after a swap)


class NoModelError(EdgefleetError):
    """No model is active yet."""


class Serving:
    """The active model and the API applications call. Thread-safe."""

    def __init__(self, call_timeout: float = 10.0):
        # (worker, ref) in one attribute: rebinding it is atomic, so no caller sees one model's worker with
        # another model's name.
        self._slot: tuple[ModelWorker, ModelRef] | None = None
        self._call_timeout = call_timeout
        self._stats: dict[str, VersionStats] = {}
        self._totals: dict[str, list[int]] = {}  # target -> [calls, failures] since start (for probation)
        self._stats_lock = threading.Lock()
        # A shadow candidate beside the serving model (`edgefleet.agent.shadow`): sampled inputs are
        # offered to it after the caller's answer is in; it never answers a caller.
        self.shadow: Shadow | None = None

    @property
    def ref(self) -> ModelRef | None:
        return self._slot[1] if self._slot else None

    @property
    def worker(self) -> ModelWorker | None:
        return self._slot[0] if self._slot else None

    def infer(self, inputs: Sequence[np.ndarray]) -> Result:
        """Runs the active model. Raises NoModelError, InvalidRequestError (inputs do not fit the model) or
        ModelError (the model failed); never fails because a swap happened during the call."""
        while True:
            slot = self._slot
            if slot is None:
                raise NoModelError("no model is active yet; the agent is waiting for an assignment")
            worker, ref = slot
            _check_inputs(worker.signature, inputs)
            started = time.perf_counter()
            try:
                outputs = worker.call(inputs, self._call_timeout)
            except WorkerGone:
                if slot is self._slot:
                    self._record(ref.target_path, time.perf_counter() - started, ok=False)
                    raise ModelError("the model worker stopped; the agent is restarting it") from None
                continue  # swapped meanwhile: run on the new model
            except ModelError:
                self._record(ref.target_path, time.perf_counter() - started, ok=False)
                raise
            self._record(ref.target_path, time.perf_counter() - started, ok=True, top=_top(outputs, worker))
            shadow = self.shadow
            if shadow is not None:
                shadow.offer(inputs, outputs)  # never waits: a full queue or the rate limit skips it
            names = tuple(t.name for t in worker.signature.outputs) if worker.signature else ()
            return Result(outputs, ref.target_path, ref.version, names)

    def _record(self, target: str, seconds: float, ok: bool, top: tuple[int, float] | None = None) -> None:
        with self._stats_lock:
            stats = self._stats.setdefault(target, VersionStats())
            stats.add(seconds * 1000, ok)
            if top is not None:
                stats.outputs.add(*top)
            totals = self._totals.setdefault(target, [0, 0])
            totals[0] += 1
            totals[1] += not ok

    def swap(self, worker: ModelWorker, ref: ModelRef) -> ModelWorker | None:
        """Makes `worker` the active one; returns the previous worker (the caller retires it off-thread)."""
        old = self._slot
        self._slot = (worker, ref)
        return old[0] if old else None

    def count_worker(self, target: str, *, crashed: bool = False, restarted: bool = False) -> None:
        """A worker of `target` died unexpectedly (`crashed`) or was started again after that (`restarted`)."""
        with self._stats_lock:
            stats = self._stats.setdefault(target, VersionStats())
            stats.worker_crashes += crashed
            stats.worker_restarts += restarted

    def take_stats(self) -> dict[str, VersionStats]:
        """Counters since the last call (for one telemetry report)."""
        with self._stats_lock:
            stats, self._stats = self._stats, {}
        return stats

    def totals(self, target: str) -> tuple[int, int]:
        """(calls, failures) on `target` since the agent started."""
        with self._stats_lock:
            calls, failures = self._totals.get(target, (0, 0))
            return calls, failures

    def stop(self) -> None:
        shadow, self.shadow = self.shadow, None
        if shadow is not None:
            shadow.stop()
        slot, self._slot = self._slot, None
        if slot is not None:
            slot[0].retire()


def _top(outputs: Sequence[np.ndarray], worker: ModelWorker) -> tuple[int, float] | None:
    if not outputs or not isinstance(outputs[0], np.ndarray):
        return None
    return top_of(outputs[0], worker.quantization)


def _check_inputs(signature: ModelSignature | None, inputs: Sequence[np.ndarray]) -> None:
    if signature is None:
        return
    if len(inputs) != len(signature.inputs):
        raise InvalidRequestError(f"the model takes {len(signature.inputs)} inputs, got {len(inputs)}")
    for spec, array in zip(signature.inputs, inputs, strict=True):
        if (
            not isinstance(array, np.ndarray)
            or array.dtype.name != spec.dtype
            or tuple(array.shape) != spec.shape
        ):
            got = f"{getattr(array, 'dtype', type(array).__name__)} {getattr(array, 'shape', '')}"
            raise InvalidRequestError(
                f"input {spec.name!r} must be {spec.dtype} {list(spec.shape)}, got {got}"
            )
