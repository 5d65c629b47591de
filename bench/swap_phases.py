"""Which part of a worker-process swap disturbs the callers, and would a cheaper swap help?

`swap_stall.py` shows that on a small device a swap makes the worst call worse by a few ms even though the
model loads in another process. This splits a swap into its parts and times each alone, while `--callers`
threads call `Serving.infer` in a tight loop on an active ModelWorker. For each action, run `--reps` times
(interleaved, with pauses), it prints how long the action took (the window) and the worst call latency
that overlapped the window (median and max over the repetitions):

    control                 sleep 150 ms: what the machine does on its own.
    ModelWorker start+warm  a new worker process (interpreter start, numpy + runtime imports), model load, one
                            call, all at normal priority. (The agent now starts the candidate's process during
                            the download and loads it at a lower priority; swap_stall.py --modes prespawn.)
    graceful exit           what the agent first did to the old worker: it is sent None and exits normally
                            (Python's full interpreter teardown), then reaped.
    retire(): SIGKILL       what the agent does now (`ModelWorker.retire`, chosen after this experiment): take
                            the worker's lock (the call in progress finishes), mark it closed, SIGKILL it. A
                            worker has nothing to flush.
    spare: load+warm        the alternative for loading: a spare Python process that already imported numpy
                            and the runtime (started beforehand, outside the window) only loads the model and
                            runs one call.

This is an experiment for the design, not a test: "graceful exit" and "spare" are not what the agent does
today.

Run: .venv/bin/python bench/swap_phases.py [--sizes 1,30] [--runtime ai-edge-litert] [--reps 8]
"""

from __future__ import annotations

import argparse
import array
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.serving import ModelWorker, Serving
from edgefleet.devtools.modelgen import build_large_mlp
from edgefleet.runtime import LITERT
from edgefleet.values import ModelRef

SPARE_CHILD = """
import sys
import numpy as np
from edgefleet.modelinfo import signature_of
from edgefleet.runtime import make_interpreter
runtime, model_path = sys.argv[1:3]
print("ready", flush=True)
sys.stdin.readline()
interpreter = make_interpreter(runtime, model_path=model_path)
detail = interpreter.get_input_details()[0]
interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], dtype=detail["dtype"]))
interpreter.invoke()
print("loaded", flush=True)
sys.stdin.readline()
"""


def run_size(mib: int, runtime: str, args: argparse.Namespace, tmp: Path) -> None:
    path = tmp / f"mlp{mib}.tflite"
    path.write_bytes(build_large_mlp(mib * 2**20))
    x = np.zeros((1, 64), np.float32)
    started: list[Any] = []  # every worker / process started, killed in `finally`

    def new_worker() -> ModelWorker:
        worker = ModelWorker(path, runtime)
        started.append(worker)
        worker.start(timeout=30)
        worker.call([x], timeout=10)
        return worker

    def new_spare() -> subprocess.Popen[str]:
        spare = subprocess.Popen(
            [sys.executable, "-c", SPARE_CHILD, runtime, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(spare)
        assert spare.stdout is not None and spare.stdout.readline().strip() == "ready"
        return spare

    def spare_load(spare: subprocess.Popen[str]) -> None:
        assert spare.stdin is not None and spare.stdout is not None
        spare.stdin.write("go\n")
        spare.stdin.flush()
        assert spare.stdout.readline().strip() == "loaded"

    def graceful_exit(worker: ModelWorker) -> None:
        with worker.lock:
            worker.closed = True
            worker._conn.send(None)  # the worker's loop ends on None
            worker._process.wait(timeout=30)
        worker.kill()

    # name -> (prepare outside the window, the action timed, clean up outside the window)
    actions: dict[str, tuple[Callable[[], Any], Callable[[Any], Any], Callable[[Any], None]]] = {
        "control: sleep 150 ms": (lambda: None, lambda _: time.sleep(0.15), lambda _: None),
        "ModelWorker start+warm": (lambda: None, lambda _: new_worker(), lambda w: w.kill()),
        "graceful exit": (new_worker, graceful_exit, lambda _: None),
        "retire(): SIGKILL": (new_worker, lambda w: w.retire(), lambda _: None),
        "spare: load+warm": (new_spare, spare_load, lambda _: None),
    }
    windows: dict[str, list[tuple[float, float]]] = {name: [] for name in actions}
    logs = [(array.array("d"), array.array("d")) for _ in range(args.callers)]
    stop = threading.Event()
    serving = Serving()

    def caller(t0s: array.array[float], t1s: array.array[float]) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            serving.infer([x])
            t1 = time.perf_counter()
            t0s.append(t0)
            t1s.append(t1)

    threads = [threading.Thread(target=caller, args=log, daemon=True) for log in logs]
    try:
        serving.swap(new_worker(), ModelRef("models/active", version="1"))
        for thread in threads:
            thread.start()
        for _ in range(args.reps):
            for name, (prepare, act, clean) in actions.items():
                obj = prepare()
                time.sleep(0.3)
                t = time.perf_counter()
                result = act(obj)
                windows[name].append((t, time.perf_counter()))
                time.sleep(0.1)
                clean(result if result is not None else obj)
                time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
        serving.stop()
        for item in started:
            item.kill()
            if isinstance(item, subprocess.Popen):
                item.wait(timeout=5)

    lengths = [min(len(a), len(b)) for a, b in logs]
    t0 = np.concatenate([np.frombuffer(a)[:n] for (a, _), n in zip(logs, lengths, strict=True)])
    t1 = np.concatenate([np.frombuffer(b)[:n] for (_, b), n in zip(logs, lengths, strict=True)])
    ms = (t1 - t0) * 1e3
    print(f"\n{mib} MiB model, {runtime}, {args.callers} callers, {args.reps} repetitions")
    print(f"{'action':<26} {'window ms':>10} {'worst call ms: median':>22} {'max':>7}")
    for name, spans in windows.items():
        worst = [float(ms[(t0 < b) & (t1 > a)].max(initial=0.0)) for a, b in spans]
        length = np.mean([b - a for a, b in spans]) * 1e3
        print(f"{name:<26} {length:>10.1f} {np.median(worst):>22.2f} {max(worst):>7.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 MiB, one repetition: does it still run")
    parser.add_argument("--sizes", default="1,30", help="model sizes in MiB")
    parser.add_argument("--runtime", default=LITERT)
    parser.add_argument("--callers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=8)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.reps = "1", 1  # every action once: the suite only checks the bench still runs
    began = time.perf_counter()
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        for mib in [int(s) for s in args.sizes.split(",")]:
            run_size(mib, args.runtime, args, Path(tmp))
    print("\nload average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"total {time.perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
