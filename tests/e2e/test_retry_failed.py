"""`edgefleet rollout retry-failed` on real processes: a real agent that failed a candidate (its signed golden
output is not what the model computes: a real failure of the candidate test, so it is listed as bad) installs
it again for each retry order, also one recorded before a server restart, at most
`decisions.MAX_RETRY_LIFTS` times; beyond that it refuses, says why, and the old model serves throughout."""

from __future__ import annotations

import argparse
import json

import numpy as np

from edgefleet import model_targets, signing
from edgefleet.agent.decisions import MAX_RETRY_LIFTS
from edgefleet.cli.client import Operator
from edgefleet.cli.publish import push_model
from edgefleet.devtools.localfleet import AgentProcess, LocalClient, LocalFleet, wait_for
from edgefleet.modelinfo import Golden

V1 = "digits/1/float32.tflite"
V2 = "digits/2/float32.tflite"
ROLLOUT = "ro-retry0001"


def _push_v2_with_a_wrong_golden_output(fleet: LocalFleet, v2: bytes) -> None:
    def corrupt_golden(_path: str, custom: dict) -> None:
        g = Golden.from_json(custom["golden"])
        wrong = Golden(g.inputs, tuple(o[:, ::-1].copy() for o in g.outputs), g.atol, g.rtol)
        custom["golden"] = model_targets.canonical_safe(wrong.to_json())

    op = Operator(
        argparse.Namespace(
            server=fleet.address,
            tls_dir=str(fleet.data_dir / "operator"),
            insecure_plaintext=False,
            token_file="",
        )
    )
    try:
        signer = signing.load_signer(fleet.keys / "targets.key")
        push_model(op, v2, "digits", "2", signer, edit_custom=corrupt_golden)
    finally:
        op.channel.close()


def _golden_failures(fleet: LocalFleet, agent: AgentProcess) -> int:
    events = fleet.cli_json("events", "--device", agent.device_id(), "--limit", "200")
    return sum(1 for e in events if e["target"] == V2 and "differs from golden" in e["reason"])


def _failed_again(fleet: LocalFleet, agent: AgentProcess, failures: int) -> None:
    """Waits for the agent's `failures`-th golden failure of V2, its bad mark back, and the rollout's member
    failed again (so that a retry-failed has a device to retry)."""

    def failed() -> bool:
        wave = json.loads(fleet.cli("rollout", "status", ROLLOUT, "--json"))["waves_status"][0]
        return (
            _golden_failures(fleet, agent) >= failures
            and V2 in agent.state()["bad_targets"]
            and wave["devices"]["failed"] == 1
        )

    wait_for(failed, 60, f"failure {failures} of {V2}")
    assert _golden_failures(fleet, agent) == failures


def _serves_v1(agent: AgentProcess) -> None:
    client = LocalClient(agent.socket)
    try:
        _, target = client.infer([np.zeros((1, 64), np.float32)])
    finally:
        client.close()
    assert target == V1 and agent.running() == V1


def _retry(fleet: LocalFleet) -> None:
    assert "1 failed device(s) assigned again" in fleet.cli("rollout", "retry-failed", ROLLOUT)


def test_retry_failed_makes_a_real_agent_try_a_bad_listed_candidate_again_within_its_bound(
    fleet: LocalFleet, digits_files: dict
) -> None:
    agent = fleet.start_agent("cam", fleet.enrollment_token())
    fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
    fleet.cli("deploy", "digits", "1", "--to", "all")
    fleet.wait_running(agent, V1)
    _push_v2_with_a_wrong_golden_output(fleet, digits_files["v2"].read_bytes())
    # One device, one wave: it is judged only once the device is healthy, so its failure holds the wave.
    fleet.cli(
        "rollout", "start", "digits", "2", "--to", "all", "--waves", "100%", "--soak", "1s",
        "--min-devices", "1", "--id", ROLLOUT,
    )  # fmt: skip
    _failed_again(fleet, agent, 1)
    assert "retries" not in agent.state()  # nothing was lifted without a retry

    _retry(fleet)  # on the control stream
    _failed_again(fleet, agent, 2)
    assert agent.state()["retries"] == {V2: [f"{ROLLOUT}-w0-retry1"]}

    # A retry recorded while the device is away, then a server restart: the order and its retry survive.
    agent.stop()
    _retry(fleet)

    def assigned() -> bool:
        return any(
            d["id"] == f"{ROLLOUT}-w0-retry2" and d["targeted"] == 1 for d in fleet.cli_json("deployments")
        )

    wait_for(assigned, 30, "the engine to point the device at the second retry order")
    fleet.stop_server()
    fleet.start_server()
    agent = fleet.start_agent("cam")
    _failed_again(fleet, agent, 3)
    assert agent.state()["retries"][V2] == [f"{ROLLOUT}-w0-retry1", f"{ROLLOUT}-w0-retry2"]

    _retry(fleet)
    _failed_again(fleet, agent, 4)
    assert len(agent.state()["retries"][V2]) == MAX_RETRY_LIFTS == 3

    # Beyond the bound the device refuses the retry, says so (the member is failed again), installs nothing.
    _retry(fleet)
    wait_for(lambda: "retries lifted its bad mark 3 times already" in agent.log(), 30, "the agent to refuse")

    def refused() -> bool:
        wave = json.loads(fleet.cli("rollout", "status", ROLLOUT, "--json"))["waves_status"][0]
        return wave["devices"]["failed"] == 1

    wait_for(refused, 30, "the refusal to reach the rollout")
    assert _golden_failures(fleet, agent) == 4
    assert len(agent.state()["retries"][V2]) == 3 and V2 in agent.state()["bad_targets"]
    _serves_v1(agent)
