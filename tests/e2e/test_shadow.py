"""Shadow mode on real processes: a real server (plaintext demo, through `devtools.relay`, which sets the
contract's `Assignment.shadow` the server's rollout engine will send), a real agent, an application calling
the local API, and a candidate (digits v2, another training seed) whose answers differ from v1's.

The application only ever gets v1's answers; the candidate's comparison reaches the server as ShadowStats
inside v1's telemetry; assigning v2 without shadow makes it serve; the output summaries and per-version
worker counters ride along, and a hot swap is never counted as a crash.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from edgefleet.cli.client import Operator
from edgefleet.cli.main import parse_args
from edgefleet.devtools.localfleet import AgentProcess, LocalClient, LocalFleet, wait_for
from edgefleet.devtools.modelgen import DigitsData
from edgefleet.devtools.relay import Relay
from edgefleet.modelinfo import run
from edgefleet.runtime import default_runtime, make_interpreter
from edgefleet.v1 import local_pb2, operator_pb2

V1 = "digits/1/float32.tflite"
V2 = "digits/2/float32.tflite"


@pytest.fixture
def relayed(tmp_path: Path) -> Iterator[tuple[LocalFleet, Relay]]:
    fleet = LocalFleet(tmp_path / "fleet", plaintext=True)
    fleet.init_keys()
    fleet.start_server()
    try:
        with Relay(fleet.port) as relay:
            yield fleet, relay
    finally:
        fleet.close()


def telemetry(fleet: LocalFleet, device_id: str) -> list[Any]:
    args = parse_args(
        ["--server", fleet.address, "--token-file", str(fleet.data_dir / "operator.token"),
         "--insecure-plaintext", "devices"]
    )  # fmt: skip
    request = operator_pb2.GetTelemetryRequest(device_id=device_id, limit=500)
    return list(Operator(args).call("GetTelemetry", request).records)


def stats_of(fleet: LocalFleet, agent: AgentProcess, target: str) -> list[Any]:
    return [s for r in telemetry(fleet, agent.device_id()) for s in r.inference if s.target_path == target]


def events(fleet: LocalFleet, agent: AgentProcess) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = fleet.cli_json("events", "--device", agent.device_id(), "--limit", "300")
    return found


def wait_event(fleet: LocalFleet, agent: AgentProcess, target: str, stage: str) -> dict[str, Any]:
    return wait_for(
        lambda: next((e for e in events(fleet, agent) if (e["target"], e["stage"]) == (target, stage)), None),
        60,
        f"{stage} {target}",
        interval=0.25,
    )


def status(agent: AgentProcess) -> local_pb2.GetAgentStatusResponse:
    client = LocalClient(agent.socket)
    try:
        return client.stub.GetAgentStatus(local_pb2.GetAgentStatusRequest(), timeout=5)
    finally:
        client.close()


def worker_pids(agent: AgentProcess) -> set[int]:
    return {
        p.pid
        for p in psutil.Process(agent.process.pid).children()
        if "edgefleet.agent.worker" in " ".join(p.cmdline())
    }


def test_shadow_candidate_answers_never_reach_the_application_and_its_agreement_reaches_the_server(
    relayed: tuple[LocalFleet, Relay], digits_files: dict[str, Path], digits: tuple[bytes, bytes, DigitsData]
) -> None:
    fleet, relay = relayed
    v1, v2, data = digits
    agent = fleet.start_agent("cam", fleet.enrollment_token(), "--server", relay.address)
    fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
    fleet.cli("deploy", "digits", "1", "--to", "all")
    fleet.wait_running(agent, V1)

    relay.shadow_paths.add(V2)
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    fleet.cli("deploy", "digits", "2", "--to", "all")
    wait_event(fleet, agent, V2, "shadow_ready")
    assert status(agent).shadow.target_path == V2 and status(agent).current.target_path == V1
    assert len(worker_pids(agent)) == 2  # the candidate's worker beside the serving one

    inputs = [data.x_test[i : i + 1].astype(np.float32) for i in range(40)]
    runtime = default_runtime()
    want_v1 = [run(make_interpreter(runtime, model_content=v1), [x])[0] for x in inputs]
    want_v2 = [run(make_interpreter(runtime, model_content=v2), [x])[0] for x in inputs]
    assert any(not np.allclose(a, b) for a, b in zip(want_v1, want_v2, strict=True))  # they do differ
    client = LocalClient(agent.socket)
    try:
        for x, expected in zip(inputs, want_v1, strict=True):
            outputs, served_by = client.infer([x])
            assert served_by == V1
            np.testing.assert_allclose(outputs[0], expected, rtol=1e-5, atol=1e-6)
    finally:
        client.close()

    def compared() -> int:
        return sum(s.shadow.compared_calls for s in stats_of(fleet, agent, V1) if s.HasField("shadow"))

    wait_for(lambda: compared() > 0, 30, "shadow stats in v1's telemetry")
    v1_stats = stats_of(fleet, agent, V1)
    shadow = [s.shadow for s in v1_stats if s.HasField("shadow")]
    assert {s.candidate_target_path for s in shadow} == {V2}
    assert sum(s.compared_calls + s.skipped_calls + s.candidate_errors for s in shadow) <= 40 + 2  # + golden
    assert sum(s.candidate_errors for s in shadow) == 0
    assert sum(s.abs_diff_sum for s in shadow) > 0
    assert not stats_of(fleet, agent, V2)  # the candidate never served a call
    # The output summary: one top class and one score bin per served call.
    served = sum(s.count for s in v1_stats)
    assert sum(sum(s.outputs.top_class_counts) for s in v1_stats) == served
    assert sum(sum(s.outputs.top_score_counts) for s in v1_stats) == served
    assert all(len(s.outputs.top_score_counts) == 10 for s in v1_stats if s.count)

    # Assigned without shadow: the already loaded candidate serves (hot swap), and the shadow is gone.
    relay.shadow_paths.clear()
    fleet.wait_running(agent, V2)
    assert not status(agent).HasField("shadow")
    reasons = [e["reason"] for e in events(fleet, agent) if (e["target"], e["stage"]) == (V2, "verified")]
    assert "the shadow candidate serves now" in reasons

    # A crash of the serving worker counts once for v2; the hot swaps before it never did.
    (pid,) = worker_pids(agent)
    psutil.Process(pid).send_signal(signal.SIGKILL)
    wait_for(lambda: sum(s.worker_restarts for s in stats_of(fleet, agent, V2)) == 1, 30, "v2's restart")
    for target, crashes in ((V1, 0), (V2, 1)):
        assert sum(s.worker_crashes for s in stats_of(fleet, agent, target)) == crashes, target


def test_shadow_survives_nothing_but_an_assignment_that_still_says_shadow(
    relayed: tuple[LocalFleet, Relay], digits_files: dict[str, Path]
) -> None:
    fleet, relay = relayed
    agent = fleet.start_agent("cam", fleet.enrollment_token(), "--server", relay.address)
    fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
    fleet.cli("deploy", "digits", "1", "--to", "all")
    fleet.wait_running(agent, V1)
    relay.shadow_paths.add(V2)
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    fleet.cli("deploy", "digits", "2", "--to", "all")
    wait_event(fleet, agent, V2, "shadow_ready")

    # Restarted while still assigned in shadow: loaded again from the verified local copy, no download.
    agent.stop()
    agent = fleet.start_agent("cam", "", "--server", relay.address)
    wait_for(lambda: status(agent).shadow.target_path == V2, 30, "the shadow to be loaded again")
    stages = [e["stage"] for e in events(fleet, agent) if e["target"] == V2]
    assert stages.count("downloading") == 1 and stages.count("shadow_ready") == 2

    # A new assignment (back to v1 alone) drops it; after a restart nothing brings it back.
    fleet.cli("deploy", "digits", "1", "--to", "all")
    wait_for(lambda: not status(agent).HasField("shadow"), 30, "the shadow to be dropped")
    assert len(worker_pids(agent)) == 1 and "shadow" not in agent.state()
    agent.stop()
    agent = fleet.start_agent("cam", "", "--server", relay.address)
    fleet.wait_running(agent, V1)
    assert not status(agent).HasField("shadow") and len(worker_pids(agent)) == 1
