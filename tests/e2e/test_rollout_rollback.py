"""A rollback order that names a rollout, from a real server to a real agent: obeyed only under the
operator's signed permit for that rollout (x-edgefleet-rollouts in targets.json), for the model and the
versions it names. The order goes out through the server's RollbackDevices RPC without the CLI's rollback
floors, and `devtools.relay` stamps it with the rollout id (what the server's rollout engine will send)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet import signing
from edgefleet.cli.client import Operator
from edgefleet.cli.main import parse_args
from edgefleet.cli.publish import publish_targets
from edgefleet.devtools.localfleet import AgentProcess, LocalClient, LocalFleet, wait_for
from edgefleet.devtools.modelgen import build_digits_model
from edgefleet.devtools.relay import Relay
from edgefleet.v1 import local_pb2, operator_pb2

V1 = "digits/1/float32.tflite"
V2 = "digits/2/float32.tflite"
V3 = "digits/3/float32.tflite"


@pytest.fixture
def on_v2(tmp_path: Path, digits_files: dict[str, Path]) -> Iterator[tuple[LocalFleet, Relay, AgentProcess]]:
    """A device that ran digits 1 (sequence 1) and now runs digits 2 (sequence 2) healthily."""
    fleet = LocalFleet(tmp_path / "fleet", plaintext=True)
    fleet.init_keys()
    fleet.start_server()
    try:
        with Relay(fleet.port) as relay:
            agent = fleet.start_agent("cam", fleet.enrollment_token(), "--server", relay.address)
            for version in ("1", "2"):
                fleet.cli(
                    "model",
                    "push",
                    str(digits_files[f"v{version}"]),
                    "--name",
                    "digits",
                    "--version",
                    version,
                )
                fleet.cli("deploy", "digits", version, "--to", "all")
                fleet.wait_running(agent, f"digits/{version}/float32.tflite")
            yield fleet, relay, agent
    finally:
        fleet.close()


def operator(fleet: LocalFleet) -> Operator:
    return Operator(
        parse_args(
            [
                "--server",
                fleet.address,
                "--token-file",
                str(fleet.data_dir / "operator.token"),
                "--insecure-plaintext",
                "devices",
            ]
        )  # fmt: skip
    )


def sign_permits(fleet: LocalFleet, permits: dict[str, signing.RolloutPermit | None]) -> None:
    signer = signing.load_signer(fleet.keys / "targets.key")
    publish_targets(
        operator(fleet), lambda current: signing.sign_targets(current, [], signer, rollouts=permits)
    )


def order_rollback(fleet: LocalFleet, relay: Relay, rollout_id: str) -> str:
    relay.rollout_id = rollout_id
    reply = operator(fleet).call(
        "RollbackDevices", operator_pb2.RollbackDevicesRequest(selector="all", reason=f"abort {rollout_id}")
    )
    command_id: str = reply.command_id
    return command_id


def events(fleet: LocalFleet, agent: AgentProcess) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = fleet.cli_json("events", "--device", agent.device_id(), "--limit", "300")
    return found


def refused(fleet: LocalFleet, agent: AgentProcess, text: str) -> None:
    wait_for(
        lambda: any(
            e["stage"] == "failed" and "rollback refused" in e["reason"] and text in e["reason"]
            for e in events(fleet, agent)
        ),
        30,
        f"the refusal: {text}",
        interval=0.25,
    )
    assert agent.running() == V2


def test_rollout_rollback_without_a_signed_permit_is_refused(
    on_v2: tuple[LocalFleet, Relay, AgentProcess],
) -> None:
    fleet, relay, agent = on_v2
    order_rollback(fleet, relay, "ro-1")
    refused(fleet, agent, "no operator signature permits going back for rollout 'ro-1'")


def test_rollout_rollback_with_another_rollouts_or_another_models_permit_is_refused(
    on_v2: tuple[LocalFleet, Relay, AgentProcess],
) -> None:
    fleet, relay, agent = on_v2
    sign_permits(fleet, {"ro-other": signing.RolloutPermit("digits", 2, 1)})
    order_rollback(fleet, relay, "ro-1")
    refused(fleet, agent, "'ro-1'")
    sign_permits(fleet, {"ro-1": signing.RolloutPermit("faces", 2, 1)})
    order_rollback(fleet, relay, "ro-1")
    refused(fleet, agent, "permits going back from faces sequence 2")


def test_rollout_rollback_under_its_signed_permit_goes_back_to_the_incumbent_and_drops_a_shadow(
    on_v2: tuple[LocalFleet, Relay, AgentProcess], tmp_path: Path
) -> None:
    fleet, relay, agent = on_v2
    v3, _ = build_digits_model(seed=2)
    (tmp_path / "v3.tflite").write_bytes(v3)
    relay.shadow_paths.add(V3)
    fleet.cli("model", "push", str(tmp_path / "v3.tflite"), "--name", "digits", "--version", "3")
    fleet.cli("deploy", "digits", "3", "--to", "all")
    wait_for(lambda: shadow_of(agent) == V3, 60, "v3 in shadow")

    sign_permits(fleet, {"ro-1": signing.RolloutPermit("digits", 2, 1)})
    command_id = order_rollback(fleet, relay, "ro-1")
    fleet.wait_running(agent, V1)
    assert agent.state()["rollbacks_done"][-1] == command_id
    assert shadow_of(agent) == "" and "shadow" not in agent.state()


def shadow_of(agent: AgentProcess) -> str:
    client = LocalClient(agent.socket)
    try:
        return str(
            client.stub.GetAgentStatus(local_pb2.GetAgentStatusRequest(), timeout=5).shadow.target_path
        )
    finally:
        client.close()
