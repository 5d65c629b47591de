"""What does each inference path of the agent cost per call, compared with a bare interpreter?

On the digits model (`build_digits_model(0)`: float32 [1, 64] -> [1, 10], ~85 KB, so the model itself is
cheap and the figures are mostly overhead), on each installed TFLite runtime, with `--iters` timed calls
after `--warmup` untimed ones, one call at a time:

    (a) bare         an interpreter in this process: set_tensor / invoke / get_tensor.
    (b) Serving      the agent's in-process Python API `Serving.infer` (the model runs in a ModelWorker child
                     process; one request/reply over a Unix socketpair, pickled).
    (c) gRPC         the agent's local gRPC InferenceService (`local_api.start_local_service`, a real grpc.aio
                     server on a Unix socket, backed by the real Serving), called with a sync `grpc` channel
                     to `unix:PATH` from another process, as an application would; the client builds the
                     request with `to_proto` and decodes the reply with `from_proto` in every call.

and, to see where the time goes:

    (b1) ModelWorker.call   (b) without the Serving wrapper (input check, stats, Result).
    (b2) echo round trip    the same kind of socketpair + multiprocessing Connection to a child that echoes
                            the pickled request's bytes back: the cost of crossing processes and back, with
                            no pickling and no model.
    (b3) pickling           pickle + unpickle of the request and of the reply, in this process.
    (b4) Serving wrapper    `Serving.infer` on an in-process fake worker that returns at once: the CPU cost
                            of the wrapper itself (input check, stats, Result).

Rows (a)-(b4) are timed in `--rounds` interleaved rounds (a drift in background load hits them all alike);
the gRPC rows run one after the other.
    (c1) gRPC, canned       (c) with an agent whose `infer` returns a precomputed Result: the gRPC stack,
                            protobuf conversion and `asyncio.to_thread` hop only, no worker.
    (c3) bare grpc.aio      a trivial aio handler returning a prebuilt reply (no `asyncio.to_thread`, no
                            tensor conversion) on the same kind of server, client in another process: the
                            floor of any grpc.aio unary call here. (c1 - c3) is the servicer's own cost.
    (c2) gRPC, same process (c) with the client as a thread in the agent's process (shares its GIL).

Figures are per call in microseconds: mean, p50, p99, the overhead over (a) at the median, and the CPU time
each process spent per call (user + system, all threads; "agent" is the serving process, i.e. this one;
"worker" the ModelWorker child; "client" the gRPC client process). CPU is what a call costs a busy 2-core
device even when latency hides it.

Run: .venv/bin/python bench/overhead.py [--iters 3000] [--warmup 300] [--quick]
(`--quick`: the first installed runtime only, 50 calls a row; what the test suite runs.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing.connection
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import psutil

from edgefleet.agent.local_api import LocalStatus, start_local_service
from edgefleet.agent.outputs import Quantization
from edgefleet.agent.serving import ModelWorker, Result, Serving
from edgefleet.devtools.modelgen import build_digits_model
from edgefleet.runtime import available_runtimes, make_interpreter, runtime_version
from edgefleet.tensors import from_proto, to_proto
from edgefleet.v1 import local_pb2, local_pb2_grpc
from edgefleet.values import ModelRef

TARGET = "models/digits"
ECHO_CHILD = """
import multiprocessing.connection, sys
conn = multiprocessing.connection.Connection(int(sys.argv[1]))
while True:
    try:
        data = conn.recv_bytes()
    except EOFError:
        break
    if not data:
        break
    conn.send_bytes(data)
"""


def sample_input() -> np.ndarray:
    return np.random.default_rng(0).random((1, 64), dtype=np.float32)


@dataclass
class Sample:
    """Latencies (us) of timed calls, and the CPU time the processes involved spent on them (seconds)."""

    latencies_us: np.ndarray
    cpu_s: dict[str, float] = field(default_factory=dict)  # "agent" (this process), "worker", "client"

    def cpu_per_call_us(self, who: str) -> float | None:
        return self.cpu_s[who] / len(self.latencies_us) * 1e6 if who in self.cpu_s else None

    @staticmethod
    def concat(parts: list[Sample]) -> Sample:
        cpu: dict[str, float] = {}
        for part in parts:
            for who, seconds in part.cpu_s.items():
                cpu[who] = cpu.get(who, 0.0) + seconds
        return Sample(np.concatenate([part.latencies_us for part in parts]), cpu)


def process_cpu(pid: int | None) -> float:
    """CPU seconds a process (all its threads, user + system) has used, to the nanosecond: Linux's
    per-process CPU clock (what clock_getcpuclockid(pid) returns), not /proc's 10 ms ticks."""
    if pid is None:
        return time.process_time()
    try:
        return time.clock_gettime(((~pid) << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
    except OSError:  # not Linux, or not allowed: /proc's ticks
        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)


def timed(
    fn: Callable[[], Any], iters: int, warmup: int, cpu_of: dict[str, int | None] | None = None
) -> Sample:
    """Per-call latencies of `fn` in microseconds, and the CPU used by the processes in `cpu_of`
    (name -> pid, None for this process) during the timed calls."""
    cpu_of = cpu_of if cpu_of is not None else {"agent": None}
    for _ in range(warmup):
        fn()
    clock = time.perf_counter
    out = np.empty(iters)
    before = {who: process_cpu(pid) for who, pid in cpu_of.items()}
    for i in range(iters):
        t = clock()
        fn()
        out[i] = clock() - t
    cpu = {who: process_cpu(pid) - before[who] for who, pid in cpu_of.items()}
    return Sample(out * 1e6, cpu)


class AgentShim:
    """Exactly what `InferenceServicer` uses of an Agent (`local_api.LocalAgent`), backed by a real Serving."""

    def __init__(self, serving: Any, runtime: str, infer: Callable[[list[np.ndarray]], Result] | None = None):
        self.serving = serving
        self.runtime = runtime
        self._infer = infer or serving.infer

    def infer(self, inputs: list[np.ndarray]) -> Result:
        return self._infer(inputs)

    def local_status(self) -> LocalStatus:
        return LocalStatus(None, None, self.runtime, runtime_version(self.runtime), connected=True)


class LocalService:
    """The agent's grpc.aio local service on its own event loop thread (as in the agent)."""

    def __init__(self, agent: Any, socket_path: str, start: Callable[..., Any] = start_local_service):
        self._agent, self.socket_path, self._start = agent, socket_path, start
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None

    def __enter__(self) -> LocalService:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(self._agent, self.socket_path, 0), self._loop)
        self._server = future.result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._server is not None:
                asyncio.run_coroutine_threadsafe(self._server.stop(None), self._loop).result(timeout=30)
            asyncio.run_coroutine_threadsafe(self._loop.shutdown_default_executor(), self._loop).result(30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()


class MinimalServicer(local_pb2_grpc.InferenceServiceServicer):
    """The gRPC floor: an aio handler that returns a prebuilt reply (no to_thread, no conversion)."""

    def __init__(self, reply: local_pb2.InferResponse):
        self.reply = reply

    async def Infer(self, request: local_pb2.InferRequest, context: Any) -> local_pb2.InferResponse:
        return self.reply


async def start_minimal_service(reply: local_pb2.InferResponse, socket_path: str, port: int) -> Any:
    server = grpc.aio.server()
    local_pb2_grpc.add_InferenceServiceServicer_to_server(MinimalServicer(reply), server)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    return server


def grpc_client(
    socket_path: str, input_name: str, iters: int, warmup: int, cpu_of: dict[str, int | None] | None = None
) -> dict[str, Any]:
    """An application's client: a sync channel to the agent's Unix socket."""
    x = sample_input()
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        stub = local_pb2_grpc.InferenceServiceStub(channel)
        last: list[Any] = [None]

        def call() -> None:
            reply = stub.Infer(local_pb2.InferRequest(inputs=[to_proto(input_name, x)]), timeout=10)
            last[0] = (reply.target_path, from_proto(reply.outputs[0]))

        sample = timed(call, iters, warmup, cpu_of)
    target, output = last[0]
    return {
        "latencies_us": sample.latencies_us.tolist(),
        "cpu_s": sample.cpu_s,
        "target_path": target,
        "output": output.tolist(),
    }


def grpc_client_process(
    socket_path: str, input_name: str, iters: int, warmup: int, worker_pid: int | None
) -> dict[str, Any]:
    """`grpc_client` in another Python process (this script with --client). The client measures its own CPU,
    the agent's (this process) and the worker's."""
    args = [sys.executable, __file__, "--client", socket_path, "--input-name", input_name]
    args += ["--iters", str(iters), "--warmup", str(warmup), "--agent-pid", str(os.getpid())]
    if worker_pid is not None:
        args += ["--worker-pid", str(worker_pid)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"gRPC client failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


class EchoChild:
    """A child that echoes bytes over a socketpair + multiprocessing Connection, as ModelWorker's worker
    answers over its own: `round_trip` costs what crossing processes and back costs, with no work."""

    def __init__(self) -> None:
        parent, child = socket.socketpair()
        self._process = subprocess.Popen(
            [sys.executable, "-c", ECHO_CHILD, str(child.fileno())],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
        )
        child.close()
        self._conn = multiprocessing.connection.Connection(parent.detach())

    def round_trip(self, payload: bytes) -> None:
        self._conn.send_bytes(payload)
        self._conn.recv_bytes()

    def close(self) -> None:
        try:
            self._conn.send_bytes(b"")
        except OSError:
            pass
        self._conn.close()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=5)


class FakeWorker:
    """Stands in for a ModelWorker inside this process: returns a fixed output at once."""

    def __init__(self, signature: Any, output: np.ndarray):
        self.signature, self._outputs = signature, [output]
        self.quantization = Quantization()  # what Serving's output summaries read: a float output
        self.lock = threading.Lock()

    def call(self, inputs: Any, timeout: float) -> list[np.ndarray]:
        with self.lock:
            return self._outputs


def interleaved(
    fns: dict[str, Callable[[], Any]], iters: int, warmup: int, rounds: int, cpu_of: dict[str, int | None]
) -> dict[str, Sample]:
    """Times every fn in `rounds` interleaved rounds, so that a change in background load hits all alike."""
    out: dict[str, list[Sample]] = {name: [] for name in fns}
    per_round = max(1, iters // rounds)
    for r in range(rounds):
        for name, fn in fns.items():
            out[name].append(timed(fn, per_round, warmup if r == 0 else max(1, warmup // 10), cpu_of))
    return {name: Sample.concat(parts) for name, parts in out.items()}


def bench_runtime(
    runtime: str, model_path: Path, model: bytes, args: argparse.Namespace
) -> list[tuple[str, Sample]]:
    x = sample_input()
    rows: list[tuple[str, Sample]] = []
    iters, warmup = args.iters, args.warmup

    # (a) bare interpreter
    interpreter = make_interpreter(runtime, model_content=model)
    (inp,) = interpreter.get_input_details()
    (outp,) = interpreter.get_output_details()
    in_index, out_index = inp["index"], outp["index"]

    def bare() -> np.ndarray:
        interpreter.set_tensor(in_index, x)
        interpreter.invoke()
        out: np.ndarray = interpreter.get_tensor(out_index)
        return out

    expected = bare().copy()
    worker = ModelWorker(model_path, runtime)
    serving = Serving()
    echo: EchoChild | None = None
    try:
        signature = worker.start(timeout=30)
        serving.swap(worker, ModelRef(TARGET, version="1"))
        result = serving.infer([x])
        assert result.target_path == TARGET and np.allclose(result.outputs[0], expected, rtol=1e-5, atol=1e-7)
        fake = Serving()
        fake.swap(FakeWorker(signature, expected), ModelRef(TARGET, version="1"))  # type: ignore[arg-type]
        assert worker.pid is not None
        worker_pid = worker.pid
        cpu_of: dict[str, int | None] = {"agent": None, "worker": worker_pid}
        echo = child = EchoChild()
        request = bytes(ForkingPickler.dumps([x]))
        reply = ("ok", [expected])

        def pickling() -> None:
            pickle.loads(ForkingPickler.dumps([x]))
            pickle.loads(ForkingPickler.dumps(reply))

        # (a), (b) and the parts of (b), interleaved
        fns: dict[str, Callable[[], Any]] = {
            "(a)  bare interpreter, same process": bare,
            "(b)  Serving.infer (worker process)": lambda: serving.infer([x]),
            "(b1)   ModelWorker.call (no Serving wrapper)": lambda: worker.call([x], 10),
            "(b2)   echo round trip, same socket, no work": lambda: child.round_trip(request),
            "(b3)   pickle+unpickle request and reply": pickling,
            "(b4)   Serving.infer on an in-process fake": lambda: fake.infer([x]),
        }
        rows.extend(interleaved(fns, iters, warmup, args.rounds, cpu_of).items())

        # (c) the local gRPC service
        input_name = signature.inputs[0].name
        with tempfile.TemporaryDirectory(prefix="ef-") as tmp:
            socket_path = os.path.join(tmp, "agent.sock")

            def client(name: str, with_worker: bool = True) -> None:
                got = grpc_client_process(
                    socket_path, input_name, iters, warmup, worker_pid if with_worker else None
                )
                assert got["target_path"] == TARGET
                assert np.allclose(np.array(got["output"], dtype=np.float32), expected, rtol=1e-5, atol=1e-7)
                rows.append((name, Sample(np.array(got["latencies_us"]), got["cpu_s"])))

            with LocalService(AgentShim(serving, runtime), socket_path):
                client("(c)  gRPC over Unix socket (client process)")
                got = grpc_client(socket_path, input_name, iters, warmup, cpu_of)
                rows.append(
                    (
                        "(c2)   gRPC, client thread in agent process",
                        Sample(np.array(got["latencies_us"]), got["cpu_s"]),
                    )
                )

            canned = Result([expected], TARGET, "1", tuple(t.name for t in signature.outputs))
            shim = AgentShim(SimpleNamespace(worker=worker), runtime, infer=lambda inputs: canned)
            with LocalService(shim, socket_path):
                client("(c1)   gRPC, canned result (no worker)", with_worker=False)

            names = [t.name for t in signature.outputs]
            reply = local_pb2.InferResponse(
                outputs=[to_proto(names[0], expected)], target_path=TARGET, version="1"
            )
            with LocalService(reply, socket_path, start=start_minimal_service):
                client("(c3)   bare grpc.aio handler, prebuilt reply", with_worker=False)
    finally:
        if echo is not None:
            echo.close()
        serving.stop()
        worker.kill()
    order = ["(a)", "(b)", "(b1)", "(b2)", "(b3)", "(b4)", "(c)", "(c1)", "(c3)", "(c2)"]
    rows.sort(key=lambda r: order.index(r[0].split()[0]))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one runtime, 50 calls a row: does it still run")
    parser.add_argument("--iters", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the in-process rows")
    parser.add_argument("--client", metavar="SOCKET", help=argparse.SUPPRESS)
    parser.add_argument("--input-name", default="pixels", help=argparse.SUPPRESS)
    parser.add_argument("--agent-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        # The suite's run only proves every row still runs; its figures are not meant to be read.
        args.iters, args.warmup, args.rounds = 50, 5, 1
    if args.client:  # the gRPC client process
        cpu_of = {"client": None, "agent": args.agent_pid}
        if args.worker_pid:
            cpu_of["worker"] = args.worker_pid
        json.dump(grpc_client(args.client, args.input_name, args.iters, args.warmup, cpu_of), sys.stdout)
        return 0

    started = time.perf_counter()
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    runtimes = available_runtimes()[:1] if args.quick else available_runtimes()
    model, _ = build_digits_model(0)
    print(
        f"digits model: {len(model)} bytes; runtimes: {', '.join(runtimes)}; "
        f"{args.iters} calls per row after {args.warmup} warm-up calls; microseconds per call"
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        model_path = Path(tmp) / "digits.tflite"
        model_path.write_bytes(model)
        for runtime in runtimes:
            results[runtime] = bench_runtime(runtime, model_path, model, args)

    for runtime, rows in results.items():
        bare_p50 = float(np.percentile(rows[0][1].latencies_us, 50))
        print()
        print(f"{runtime} {runtime_version(runtime)}")
        head = (
            f"{'path':<46} {'mean':>7} {'p50':>7} {'p99':>7} {'p50-bare':>9} {'p50/bare':>9}"
            f"  | CPU/call: {'agent':>6} {'worker':>6} {'client':>6}"
        )
        print(head)
        print("-" * len(head))
        for name, sample in rows:
            lat = sample.latencies_us
            p50 = float(np.percentile(lat, 50))
            extra = (
                f"{p50 - bare_p50:>+9.1f} {p50 / bare_p50:>8.1f}x" if not name.startswith("(a)") else " " * 19
            )
            cpu = [sample.cpu_per_call_us(who) for who in ("agent", "worker", "client")]
            print(
                f"{name:<46} {lat.mean():>7.1f} {p50:>7.1f} {float(np.percentile(lat, 99)):>7.1f} {extra}"
                f"  |           {'  '.join('     -' if c is None else f'{c:>6.1f}' for c in cpu)}"
            )
        p = {name.split()[0]: float(np.percentile(sample.latencies_us, 50)) for name, sample in rows}
        print(
            f"  at the median: worker IPC (b1 - a) {p['(b1)'] - p['(a)']:.0f} us, of which the bare process "
            f"round trip (b2) {p['(b2)']:.0f} us and pickling (b3) {p['(b3)']:.0f} us; Serving wrapper "
            f"(b4) {p['(b4)']:.0f} us; gRPC on top of Serving (c - b) {p['(c)'] - p['(b)']:.0f} us "
            f"(gRPC alone (c1): {p['(c1)']:.0f} us, of which the grpc.aio floor (c3) {p['(c3)']:.0f} us)"
        )
    print()
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
