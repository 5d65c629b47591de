"""What a shadow candidate costs the served path, on a real agent, in one run.

A real server (plaintext demo) and a real agent serving digits v1; an application calls the agent's local
API in a tight loop (`--callers` threads, each its own channel) through three phases of `--seconds` each:

    before   v1 alone
    shadow   v2 loaded beside it in shadow (`devtools.relay` sets Assignment.shadow): sampled calls also run
             on v2, off the served path, bounded by the agent's rate limit and CPU budget (printed)
    after    v1 alone again (a new assignment dropped the shadow): the control for drift of the machine

Printed per phase: calls, p50, p99 and max of served calls (ms, as the application sees them), failures;
for the shadow phase also what the agent compared and skipped (from its telemetry). Then the output
summary's own cost per call (top class + score bin, measured in this process on v1's output).

Run: .venv/bin/python bench/shadow_cost.py [--seconds 10] [--callers 2] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edgefleet.agent.outputs import OutputTally, top_of
from edgefleet.cli.client import Operator
from edgefleet.cli.main import parse_args
from edgefleet.devtools.localfleet import LocalClient, LocalFleet, wait_for
from edgefleet.devtools.modelgen import build_digits_model
from edgefleet.devtools.relay import Relay
from edgefleet.modelinfo import run
from edgefleet.runtime import default_runtime, make_interpreter
from edgefleet.v1 import local_pb2, operator_pb2

V1 = "digits/1/float32.tflite"
V2 = "digits/2/float32.tflite"
MAX_PER_S = 10.0  # the agent's defaults, passed explicitly so the figures name them
CPU_BUDGET = 0.2


def load(socket: str, inputs: list[np.ndarray], seconds: float, callers: int) -> tuple[list[float], int]:
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def caller(offset: int) -> None:
        client = LocalClient(socket)
        mine: list[float] = []
        i = offset
        try:
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    client.infer([inputs[i % len(inputs)]])
                    mine.append((time.perf_counter() - started) * 1000)
                except Exception:
                    with lock:
                        failures[0] += 1
                i += 1
        finally:
            client.close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, failures[0]


def row(name: str, latencies: list[float], failures: int) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan")
    p50 = statistics.median(ordered) if ordered else float("nan")
    top = ordered[-1] if ordered else float("nan")
    return f"{name:<8} {len(ordered):>7} {p50:>8.3f} {p99:>8.3f} {top:>8.3f} {failures:>8}"


def shadow_totals(fleet: LocalFleet, device_id: str) -> tuple[int, int, int]:
    args = parse_args(
        ["--server", fleet.address, "--token-file", str(fleet.data_dir / "operator.token"),
         "--insecure-plaintext", "devices"]
    )  # fmt: skip
    records = (
        Operator(args)
        .call("GetTelemetry", operator_pb2.GetTelemetryRequest(device_id=device_id, limit=1000))
        .records
    )
    shadows = [s.shadow for r in records for s in r.inference if s.HasField("shadow")]
    return (
        sum(s.compared_calls for s in shadows),
        sum(s.skipped_calls for s in shadows),
        sum(s.candidate_errors for s in shadows),
    )


def summary_cost(v1: bytes, inputs: list[np.ndarray], calls: int = 20_000) -> float:
    """µs per call of the output summary (top class + top score bin) on v1's real output."""
    outputs = [run(make_interpreter(default_runtime(), model_content=v1), [x])[0] for x in inputs[:16]]
    tally = OutputTally()
    started = time.perf_counter()
    for i in range(calls):
        tally.add(*top_of(outputs[i % len(outputs)]))
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="per phase")
    p.add_argument("--callers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="0.5 s phases, one caller (for the test suite)")
    a = p.parse_args()
    seconds, callers = (0.5, 1) if a.quick else (a.seconds, a.callers)
    warm_up = 0.2 if a.quick else 1.0
    # --quick: a periodic check each second (LocalFleet's is 5 s); the shadow is dropped at the agent's next
    # check after the v1 deployment, so this takes ~4 s off its wait.
    quick_check = ["--check-interval", "1"] if a.quick else []
    v1, data = build_digits_model(seed=0)
    v2, _ = build_digits_model(seed=1)
    inputs = [data.x_test[i : i + 1].astype(np.float32) for i in range(64)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "v1.tflite").write_bytes(v1)
        (root / "v2.tflite").write_bytes(v2)
        fleet = LocalFleet(root / "fleet", plaintext=True)
        fleet.init_keys()
        fleet.start_server()
        try:
            with Relay(fleet.port) as relay:
                agent = fleet.start_agent(
                    "bench", fleet.enrollment_token(), "--server", relay.address,
                    "--shadow-max-per-s", str(MAX_PER_S), "--shadow-cpu-budget", str(CPU_BUDGET),
                    *quick_check,
                )  # fmt: skip
                fleet.cli("model", "push", str(root / "v1.tflite"), "--name", "digits", "--version", "1")
                fleet.cli("deploy", "digits", "1", "--to", "all")
                fleet.wait_running(agent, V1)
                load(agent.socket, inputs, warm_up, callers)
                rows = [row("before", *load(agent.socket, inputs, seconds, callers))]

                relay.shadow_paths.add(V2)
                fleet.cli("model", "push", str(root / "v2.tflite"), "--name", "digits", "--version", "2")
                fleet.cli("deploy", "digits", "2", "--to", "all")
                wait_for(lambda: _shadow_of(agent.socket) == V2, 60, "the shadow to load")
                rows.append(row("shadow", *load(agent.socket, inputs, seconds, callers)))
                time.sleep(1.5)  # one more telemetry report carries the last comparisons
                compared, skipped, errors = shadow_totals(fleet, agent.device_id())

                fleet.cli("deploy", "digits", "1", "--to", "all")
                wait_for(lambda: _shadow_of(agent.socket) == "", 60, "the shadow to be dropped")
                rows.append(row("after", *load(agent.socket, inputs, seconds, callers)))
        finally:
            fleet.close()
    print(f"shadow limits: at most {MAX_PER_S:g} candidate calls/s, CPU budget {CPU_BUDGET:.0%} of one core")
    print(f"{seconds:g} s per phase, {callers} caller(s), local API over the Unix socket; latencies in ms")
    print(f"{'phase':<8} {'calls':>7} {'p50':>8} {'p99':>8} {'max':>8} {'failed':>8}")
    print("\n".join(rows))
    print(f"shadow phase: {compared} compared on the candidate, {skipped} skipped (limits), {errors} errors")
    print(f"output summary: {summary_cost(v1, inputs):.2f} us per served call (top class + score bin)")


def _shadow_of(socket: str) -> str:
    client = LocalClient(socket)
    try:
        reply = client.stub.GetAgentStatus(local_pb2.GetAgentStatusRequest(), timeout=5)
        return str(reply.shadow.target_path)
    finally:
        client.close()


if __name__ == "__main__":
    main()
