"""How long does a hot swap stall the callers of `Serving.infer`?

For a ~1 MiB and a ~30 MiB model (`build_large_mlp`), on each installed TFLite runtime, this serves model A,
runs `--callers` threads calling `Serving.infer` in a tight loop (every call's start/end time, result and
exception is recorded), measures a baseline for `--baseline` seconds, then performs `--swaps` hot swaps
alternating B/A exactly the way the agent does:

    load    a background thread starts a new `ModelWorker` for the other model and warms it with one call
            (the agent's `LocalModels.test_candidate`: start + golden call);
    switch  `Serving.swap(new, ref)` on the "event loop" (main) thread, then `old.retire()` in another
            thread, off the hot path.

The *swap window* of one swap runs from the start of its load to the end of the old worker's retire.

Figures (all latencies are wall-clock per call, as the caller sees them):

    base p50/p99/max   latency of calls in the baseline period (no swap in progress, after a warm-up).
    swap p99/max       latency of the calls that overlap a swap window (started before the window ended and
                       finished after it began), over all swaps.
    stall              the *longest stall seen by a caller during a swap*:
                           max(0, swap max - base p99)
                       i.e. how much longer than a normal slow (p99) call the worst call overlapping a swap
                       took. 0 means no caller noticed the swaps beyond ordinary jitter.
    load max/switch max  the worst latency among calls overlapping the load phase / the switch phase (swap +
                       retire) of a window: tells which phase causes the stall.
    ctl max            the control: after each swap, a window as long as that swap's window is placed in the
                       pause before the next swap; this is the worst call overlapping one of them (and no swap
                       window). Same period, same length, no swap in progress: what the machine alone does.
    typ.               median over the swaps of (worst call in the swap window) minus the median over the
                       control windows of (worst call in the control window): the typical extra worst-case
                       latency one swap causes, robust to a single outlier from the machine.
    failed             calls that raised (must be 0: a swap never fails a call).
    inconsistent       results whose output does not equal the output of the model named by
                       `result.target_path` on the same input (a torn result); the two models are built from
                       different seeds, so their outputs differ.

`calls per caller` shows whether the callers are served fairly. The load average is printed before and
after: other processes on a 2-core machine show up in every latency figure.

The same is measured for the naive in-process alternative (`naive` rows): a bare interpreter in the serving
process behind a lock, swapped by building a new interpreter (`make_interpreter`: `Interpreter(...)` +
`allocate_tensors()`) in a background thread while the callers loop. Those steps hold the GIL, which is why
the agent loads candidates in worker processes. (The naive server uses a FIFO lock; see `FifoLock`.)

Run: .venv/bin/python bench/swap_stall.py [--callers 2] [--swaps 8] [--baseline 2]
"""

from __future__ import annotations

import argparse
import array
import collections
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from swap_tables import print_tables  # bench/ is this script's folder, so on sys.path

from edgefleet.agent.serving import ModelWorker, Serving
from edgefleet.devtools.modelgen import build_large_mlp
from edgefleet.runtime import available_runtimes, make_interpreter
from edgefleet.values import ModelRef

CALL_TIMEOUT_S = 10.0
WARMUP_S = 0.3  # calls in the first WARMUP_S after the callers start are not counted in the baseline
GAP_S = 0.4  # steady serving between two swaps (holds the control window)
PRESPAWN_S = 0.6  # "prespawn" mode: time for the early-started worker to import its runtime (a download)


@dataclass
class Model:
    name: str  # the target_path reported in results
    path: Path
    content: bytes


@dataclass
class Window:
    load_start: float
    swapped: float = 0.0
    end: float = 0.0


@dataclass
class Outcome:
    runtime: str
    size: str
    mode: str
    calls: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    inconsistent: int = 0
    torn: int = 0
    base: np.ndarray = field(default_factory=lambda: np.zeros(0))
    swap: np.ndarray = field(default_factory=lambda: np.zeros(0))
    per_control_max: list[float] = field(default_factory=list)
    per_caller: list[int] = field(default_factory=list)
    load_max: float = 0.0
    switch_max: float = 0.0
    per_swap_max: list[float] = field(default_factory=list)
    load_s: list[float] = field(default_factory=list)
    retire_s: list[float] = field(default_factory=list)
    per_target: dict[str, int] = field(default_factory=dict)

    @property
    def typical_stall_ms(self) -> float:
        return float(np.median(self.per_swap_max) - np.median(self.per_control_max))

    @property
    def stall_ms(self) -> float:
        if not len(self.swap) or not len(self.base):
            return float("nan")
        return max(0.0, float(self.swap.max()) - float(np.percentile(self.base, 99)))


OK, INCONSISTENT, TORN, FAILED = 0, 1, 2, 3


class CallLog:
    """One caller's calls, kept in flat arrays: no per-call Python objects survive a call, so the log itself
    does not slow the cyclic GC down (keeping ~10^5 result tuples alive costs 10-20 ms per full collection,
    which showed up as fake "stalls")."""

    def __init__(self) -> None:
        self.t0 = array.array("d")
        self.t1 = array.array("d")
        self.status = array.array("b")
        self.target = array.array("b")  # index into the model names; -1 for a failed call
        self.errors: list[str] = []


def _caller(
    infer: Callable[[], tuple[str, np.ndarray]],
    stop: threading.Event,
    log: CallLog,
    names: list[str],
    expected: dict[str, np.ndarray],
) -> None:
    clock = time.perf_counter
    expected_bytes = {name: expected[name].tobytes() for name in names}
    index = {name: i for i, name in enumerate(names)}
    while not stop.is_set():
        t0 = clock()
        try:
            target, output = infer()
        except Exception as e:  # recorded, never raised: a failed call is a finding
            t1 = clock()
            log.t0.append(t0)
            log.t1.append(t1)
            log.status.append(FAILED)
            log.target.append(-1)
            if len(log.errors) < 5:
                log.errors.append(f"{type(e).__name__}: {e}")
            continue
        t1 = clock()
        status = OK
        if output.tobytes() != expected_bytes[target] and not np.allclose(
            output, expected[target], rtol=1e-5, atol=1e-7
        ):
            other = names[1 - index[target]]
            torn = np.allclose(output, expected[other], rtol=1e-5, atol=1e-7)
            status = TORN if torn else INCONSISTENT
            if len(log.errors) < 5:
                holder = other if torn else "neither model"
                log.errors.append(f"result says {target} but holds the output of {holder}")
        log.t0.append(t0)
        log.t1.append(t1)
        log.status.append(status)
        log.target.append(index[target])


class FifoLock:
    """A lock handed to its waiters in arrival order.

    The naive in-process server needs one: with a plain `threading.Lock` around `invoke()` (which releases
    the GIL) the thread that just released the lock re-takes it before the woken waiter runs, and the other
    caller starves for 100-500 ms. That would hide the effect this benchmark is about (loading holds the GIL).
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: collections.deque[threading.Lock] = collections.deque()

    def __enter__(self) -> FifoLock:
        with self._mutex:
            if not self._held:
                self._held = True
                return self
            baton = threading.Lock()
            baton.acquire()
            self._waiters.append(baton)
        baton.acquire()  # released by the previous holder: the lock is now ours
        return self

    def __exit__(self, *exc: object) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()  # hand over; _held stays True
            else:
                self._held = False


Slot = tuple[Any, FifoLock, int, int, str]


class NaiveServing:
    """The in-process alternative: one interpreter in this process, swapped by reference."""

    def __init__(self) -> None:
        self.slot: Slot | None = None

    @staticmethod
    def load(runtime: str, model: Model, x: np.ndarray) -> Slot:
        interpreter = make_interpreter(runtime, model_content=model.content)
        slot = (
            interpreter,
            FifoLock(),
            interpreter.get_input_details()[0]["index"],
            interpreter.get_output_details()[0]["index"],
            model.name,
        )
        NaiveServing.run(slot, x)  # warm, like the agent's golden call
        return slot

    @staticmethod
    def run(slot: Slot, x: np.ndarray) -> np.ndarray:
        interpreter, lock, input_index, output_index, _ = slot
        with lock:
            interpreter.set_tensor(input_index, x)
            interpreter.invoke()
            output: np.ndarray = interpreter.get_tensor(output_index)
        return output

    def infer(self, x: np.ndarray) -> tuple[str, np.ndarray]:
        slot = self.slot
        assert slot is not None
        return slot[4], self.run(slot, x)


def _run_in_thread(target: Callable[[], Any]) -> tuple[float, Any]:
    """Runs `target` in a new thread (as the agent's asyncio.to_thread does) and returns its duration."""
    box: dict[str, Any] = {}

    def body() -> None:
        t = time.perf_counter()
        try:
            box["value"] = target()
        except BaseException as e:
            box["error"] = e
        box["seconds"] = time.perf_counter() - t

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return float(box["seconds"]), box.get("value")


def run_case(
    runtime: str,
    size: str,
    mode: str,
    models: tuple[Model, Model],
    expected: dict[str, np.ndarray],
    x: np.ndarray,
    args: argparse.Namespace,
) -> Outcome:
    outcome = Outcome(runtime, size, mode)
    workers: list[ModelWorker] = []  # every worker started, killed in `finally` whatever happens
    retirers: list[threading.Thread] = []
    stop = threading.Event()
    logs = [CallLog() for _ in range(args.callers)]
    names = [m.name for m in models]
    callers: list[threading.Thread] = []
    windows: list[Window] = []
    serving = Serving(call_timeout=CALL_TIMEOUT_S)
    naive = NaiveServing()

    def start_worker(model: Model, spawned: ModelWorker | None = None, candidate: bool = True) -> ModelWorker:
        # As the agent does: a candidate (another model is serving) loads at a lower priority.
        worker = spawned or ModelWorker(model.path, runtime, low_priority=candidate)
        workers.append(worker)
        # The agent's golden check: one call on the candidate, run as part of its load, before it serves.
        worker.load(model.path, timeout=30, warm_inputs=[x])
        if worker.warm_error is not None or worker.warm_outputs is None:
            raise RuntimeError(f"{model.name}: the warm-up call failed: {worker.warm_error}")
        (out,) = worker.warm_outputs
        if not np.allclose(out, expected[model.name], rtol=1e-5, atol=1e-7):
            raise RuntimeError(f"{model.name}: wrong warm-up output")
        return worker

    if mode in ("worker", "prespawn"):

        def infer() -> tuple[str, np.ndarray]:
            result = serving.infer([x])
            return result.target_path, result.outputs[0]

    else:

        def infer() -> tuple[str, np.ndarray]:
            return naive.infer(x)

    try:
        if mode in ("worker", "prespawn"):
            serving.swap(start_worker(models[0], candidate=False), ModelRef(models[0].name, version="a"))
        else:
            naive.slot = NaiveServing.load(runtime, models[0], x)

        for log in logs:
            thread = threading.Thread(target=_caller, args=(infer, stop, log, names, expected), daemon=True)
            thread.start()
            callers.append(thread)
        started = time.perf_counter()
        time.sleep(WARMUP_S + args.baseline)
        baseline_end = time.perf_counter()
        time.sleep(GAP_S)

        for i in range(args.swaps):
            model = models[(i + 1) % 2]
            spawned = None
            if mode == "prespawn":
                # As the agent does: the candidate's process starts when the update starts and imports the
                # runtime during the download (here: a pause). Its CPU cost lands outside the swap window,
                # in the time the control windows sample.
                spawned = ModelWorker(model.path, runtime, low_priority=True).spawn()
                workers.append(spawned)
                time.sleep(PRESPAWN_S)
            window = Window(time.perf_counter())
            if mode in ("worker", "prespawn"):
                seconds, new = _run_in_thread(
                    lambda model=model, spawned=spawned: start_worker(model, spawned)
                )
                window.swapped = time.perf_counter()
                old = serving.swap(new, ModelRef(model.name, version=model.name[-1]))
                assert old is not None
                retire_started = time.perf_counter()
                retirer = threading.Thread(target=old.retire)
                retirer.start()
                retirers.append(retirer)
                retirer.join()  # only the window bookkeeping waits; the callers never do
            else:
                seconds, new_slot = _run_in_thread(lambda model=model: NaiveServing.load(runtime, model, x))
                window.swapped = time.perf_counter()
                old_slot, naive.slot = naive.slot, new_slot
                retire_started = time.perf_counter()

                def drop(box: list[Any]) -> None:
                    with box[0][1]:  # let the call in progress finish, then drop the interpreter
                        pass
                    box.clear()

                box = [old_slot]
                del old_slot
                retirer = threading.Thread(target=drop, args=(box,))
                retirer.start()
                retirers.append(retirer)
                del box
                retirer.join()
            window.end = time.perf_counter()
            outcome.load_s.append(seconds)
            outcome.retire_s.append(window.end - retire_started)
            windows.append(window)
            time.sleep(GAP_S)
        finished = time.perf_counter()
    finally:
        stop.set()
        for thread in callers:
            thread.join(timeout=CALL_TIMEOUT_S + 5)
        for thread in retirers:
            thread.join(timeout=10)
        serving.stop()
        for worker in workers:
            worker.kill()
        naive.slot = None

    # ---- analysis --------------------------------------------------------------------------------------
    # Each caller appended t0, t1, status and target after every call; trim to whole calls, to be safe.
    lengths = [min(len(log.t0), len(log.t1), len(log.status), len(log.target)) for log in logs]
    t0 = np.concatenate([np.frombuffer(log.t0)[:n] for log, n in zip(logs, lengths, strict=True)])
    t1 = np.concatenate([np.frombuffer(log.t1)[:n] for log, n in zip(logs, lengths, strict=True)])
    status = np.concatenate(
        [np.frombuffer(log.status, dtype=np.int8)[:n] for log, n in zip(logs, lengths, strict=True)]
    )
    target = np.concatenate(
        [np.frombuffer(log.target, dtype=np.int8)[:n] for log, n in zip(logs, lengths, strict=True)]
    )
    ms = (t1 - t0) * 1e3
    outcome.calls = len(ms)
    outcome.failed = int((status == FAILED).sum())
    outcome.torn = int((status == TORN).sum())
    outcome.inconsistent = int((status == INCONSISTENT).sum()) + outcome.torn
    outcome.errors = [e for log in logs for e in log.errors][:5]
    outcome.per_target = {name: int((target == i).sum()) for i, name in enumerate(names)}
    ok = status != FAILED
    outcome.base = ms[ok & (t0 >= started + WARMUP_S) & (t1 <= baseline_end)]
    in_any = np.zeros(len(ms), dtype=bool)
    for w in windows:
        overlap = ok & (t0 < w.end) & (t1 > w.load_start)
        in_any |= overlap
        outcome.per_swap_max.append(float(ms[overlap].max(initial=0.0)))
        outcome.load_max = max(outcome.load_max, float(ms[overlap & (t0 < w.swapped)].max(initial=0.0)))
        outcome.switch_max = max(outcome.switch_max, float(ms[overlap & (t1 > w.swapped)].max(initial=0.0)))
    outcome.swap = ms[in_any]
    # The control: after each swap, a window as long as that swap's, centred in the pause before the next
    # swap (clipped to it); calls overlapping it that overlap no swap window.
    ends = [w.load_start for w in windows[1:]] + [finished]
    for w, next_start in zip(windows, ends, strict=True):
        length = min(w.end - w.load_start, next_start - w.end)
        middle = (w.end + next_start) / 2
        overlap = ok & ~in_any & (t0 < middle + length / 2) & (t1 > middle - length / 2)
        outcome.per_control_max.append(float(ms[overlap].max(initial=0.0)))
    outcome.per_caller = lengths
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run on one runtime: does it still run")
    parser.add_argument("--callers", type=int, default=2)
    parser.add_argument("--swaps", type=int, default=8)
    parser.add_argument("--baseline", type=float, default=2.0, help="seconds of baseline")
    parser.add_argument("--sizes", default="1,30", help="model sizes in MiB, comma separated")
    parser.add_argument("--modes", default="worker,prespawn,naive")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.swaps, args.baseline, args.modes = "1", 2, 0.5, "prespawn"

    runtimes = available_runtimes()[:1] if args.quick else available_runtimes()
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"runtimes: {', '.join(runtimes) or 'none'}; python {sys.version.split()[0]}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    outcomes = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        for mib in [int(s) for s in args.sizes.split(",")]:
            size = f"{mib} MiB"
            models = []
            for seed, letter in ((0, "A"), (1, "B")):
                content = build_large_mlp(mib * 2**20, seed=seed)
                path = Path(tmp) / f"mlp{mib}-{letter}.tflite"
                path.write_bytes(content)
                models.append(Model(f"models/mlp{mib}-{letter}", path, content))
            print(f"{size}: {len(models[0].content) / 2**20:.1f} MiB files")
            for runtime in runtimes:
                expected = {}
                for m in models:  # the output each model gives on x, from a bare interpreter
                    interpreter = make_interpreter(runtime, model_content=m.content)
                    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
                    interpreter.invoke()
                    expected[m.name] = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
                    del interpreter
                a, b = (expected[m.name] for m in models)
                assert not np.allclose(a, b, rtol=1e-3), "the two models must give different outputs"
                for mode in args.modes.split(","):
                    o = run_case(runtime, size, mode, (models[0], models[1]), expected, x, args)
                    print(
                        f"  {runtime:<15} {mode:<7} calls={o.calls} failed={o.failed} "
                        f"stall={o.stall_ms:.3f} ms",
                        flush=True,
                    )
                    outcomes.append(o)
    print_tables(outcomes, args)
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"total {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
