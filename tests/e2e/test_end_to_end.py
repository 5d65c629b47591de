"""The whole path on real processes over loopback: push, sign, deploy, download, verify, hot swap, report,
serve, roll back. Attack and fault tests live in test_attacks.py and test_faults.py."""

from __future__ import annotations

import numpy as np

from edgefleet.devtools.localfleet import InferenceLoad, LocalClient, LocalFleet, wait_for
from edgefleet.devtools.modelgen import DigitsData
from edgefleet.runtime import LITERT, TFLITE_RUNTIME

V1 = "digits/1/float32.tflite"
V2 = "digits/2/float32.tflite"


def test_push_deploy_hot_swap_rollback_with_no_failed_inference(
    fleet: LocalFleet, digits_files: dict, digits: tuple[bytes, bytes, DigitsData]
) -> None:
    _, _, data = digits
    token = fleet.enrollment_token(group="lab", uses=2)
    litert = fleet.start_agent("cam-litert", token, "--runtime", LITERT)
    legacy = fleet.start_agent("cam-legacy", token, "--runtime", TFLITE_RUNTIME)

    fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
    fleet.cli("deploy", "digits", "1", "--to", "group:lab")
    for agent in (litert, legacy):
        fleet.wait_running(agent, V1)

    # Inference through the local service answers with the model that produced it, and it is right.
    client = LocalClient(litert.socket)
    outputs, target = client.infer([data.x_test[:1]])
    assert target == V1
    assert outputs[0].shape == (1, 10) and int(np.argmax(outputs[0])) == int(data.y_test[0])
    client.close()

    # v2 goes out while both devices serve traffic: not one call may fail.
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    with InferenceLoad([litert.socket, legacy.socket], [data.x_test[:1]]) as load:
        wait_for(lambda: load.report.calls > 50, 20, "traffic to start")
        fleet.cli("deploy", "digits", "2", "--to", "all")
        for agent in (litert, legacy):
            fleet.wait_running(agent, V2)
        calls = load.report.calls
        wait_for(lambda: load.report.calls > calls + 50, 20, "traffic on v2")
    assert load.report.failures == 0, load.report.errors
    assert load.report.by_model.get(V1, 0) > 0 and load.report.by_model.get(V2, 0) > 0

    # Each stage was reported separately, in order.
    events = fleet.cli_json("events", "--device", litert.device_id())
    stages = [e["stage"] for e in events if e["target"] == V2]
    assert stages == ["downloading", "downloaded", "verified", "activated", "healthy"]

    # Rollback: back to v1 from the local copy, at once, and no download.
    result = fleet.cli_json("rollback", "--to", "all", "--reason", "test")
    assert result["targeted"] == 2 and result["notified"] == 2
    for agent in (litert, legacy):
        fleet.wait_running(agent, V1, timeout=20)
        assert agent.state()["previous"]["target_path"] == V2
    events = fleet.cli_json("events", "--device", legacy.device_id())
    after_rollback = events[[e["stage"] for e in events].index("rolled_back") :]
    assert [e["stage"] for e in after_rollback] == ["rolled_back"]

    # The server's view agrees with the devices' own, and telemetry arrived with inference counts.
    devices = {d["id"]: d for d in fleet.devices()}
    assert {d["runtime"] for d in devices.values()} == {LITERT, TFLITE_RUNTIME}
    telemetry = fleet.cli_json("telemetry", litert.device_id(), "--limit", "100")
    assert sum(r["inferences"] for r in telemetry) > 0
    assert all(r["errors"] == 0 for r in telemetry)


def test_device_enrolling_after_deploy_gets_the_version(fleet: LocalFleet, digits_files: dict) -> None:
    fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
    fleet.cli("deploy", "digits", "1", "--to", "all", "--allow-empty")  # before any device enrolls
    late = fleet.start_agent("late", fleet.enrollment_token())
    fleet.wait_running(late, V1)


def test_agent_restart_keeps_serving_from_its_durable_state(fleet: LocalFleet, digits_files: dict) -> None:
    agent = fleet.start_agent("cam", fleet.enrollment_token())
    fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
    fleet.cli("deploy", "digits", "1", "--to", "all")
    fleet.wait_running(agent, V1)
    agent.stop(kill=True)
    fleet.stop_server()  # it must serve without the server
    agent = fleet.start_agent("cam")
    client = LocalClient(agent.socket)
    _, target = wait_for(lambda: _try(client), 30, "inference after restart")
    assert target == V1
    client.close()


def _try(client: LocalClient) -> tuple | None:
    import grpc

    try:
        return client.infer([np.zeros((1, 64), np.float32)])
    except grpc.RpcError:
        return None
