"""An application defers installs through the local API, on a real agent and server: bounded by the agent's
config, kept across a restart, reported once as "deferred", started when the deferral ends; a rollback
order is never deferred."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from conftest import v1_running

from edgefleet.devtools.localfleet import AgentProcess, LocalClient, LocalFleet, wait_for
from edgefleet.v1 import local_pb2

V1 = "digits/1/float32.tflite"
V2 = "digits/2/float32.tflite"


def defer(agent: AgentProcess, seconds: int) -> local_pb2.DeferUpdatesResponse:
    client = LocalClient(agent.socket)
    try:
        reply: local_pb2.DeferUpdatesResponse = client.stub.DeferUpdates(
            local_pb2.DeferUpdatesRequest(seconds=seconds, reason="recording a clip"), timeout=5
        )
        return reply
    finally:
        client.close()


def deferred_until(agent: AgentProcess) -> int:
    client = LocalClient(agent.socket)
    try:
        until: int = client.stub.GetAgentStatus(
            local_pb2.GetAgentStatusRequest(), timeout=5
        ).deferred_until_unix_ms
        return until
    finally:
        client.close()


def deferred_events(fleet: LocalFleet, agent: AgentProcess) -> list[dict]:
    return [
        e
        for e in fleet.cli_json("events", "--device", agent.device_id(), "--limit", "300")
        if e["stage"] == "deferred"
    ]


def test_a_deferral_is_bounded_durable_reported_once_and_never_holds_a_rollback(
    fleet: LocalFleet, digits_files: dict[str, Path]
) -> None:
    agent = v1_running(fleet, digits_files, "--max-deferral", "30")
    with pytest.raises(grpc.RpcError) as refused:
        defer(agent, -5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    granted = defer(agent, 10**6)
    assert granted.granted_seconds == 30  # the agent's bound, not the application's wish
    assert deferred_until(agent) == granted.deferred_until_unix_ms > time.time() * 1000
    agent.stop()
    agent = fleet.start_agent("cam")
    assert deferred_until(agent) == granted.deferred_until_unix_ms  # kept across a restart

    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    fleet.cli("deploy", "digits", "2", "--to", "all")
    wait_for(lambda: deferred_events(fleet, agent), 30, "the deferred event")
    time.sleep(3)  # periodic checks repeat the assignment meanwhile: still one report, still v1
    assert len(deferred_events(fleet, agent)) == 1 and agent.running() == V1

    # A shorter deferral replaces it; when it ends the install starts.
    assert defer(agent, 1).granted_seconds == 1
    fleet.wait_running(agent, V2)

    # A rollback order is never deferred.
    defer(agent, 30)
    fleet.cli("rollback", "--to", "all")
    fleet.wait_running(agent, V1, timeout=20)
