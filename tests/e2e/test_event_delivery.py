"""Events survive the end of a control stream: a server restart (or any stream that dies) must not lose the
next thing the device says. gRPC keeps reading the request iterator of a call that is over; before the fix
the first event after every reconnect went into the dead call and was lost (here: "downloading")."""

from __future__ import annotations

from conftest import v1_running

from edgefleet.devtools.localfleet import LocalFleet, wait_for

V2 = "digits/2/float32.tflite"


def test_every_step_of_an_update_after_a_server_restart_reaches_the_server(
    fleet: LocalFleet, digits_files: dict
) -> None:
    agent = v1_running(fleet, digits_files)
    fleet.stop_server()
    fleet.start_server()
    wait_for(lambda: agent.log().count("connected to") >= 2, 30, "the agent to reconnect")
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    fleet.cli("deploy", "digits", "2", "--to", "all")
    fleet.wait_running(agent, V2)
    stages = [
        e["stage"] for e in fleet.cli_json("events", "--device", agent.device_id()) if e["target"] == V2
    ]
    assert {"downloading", "downloaded", "verified", "activated", "healthy"} <= set(stages), stages
    # After the restart the agent sent its last event (v1 healthy) again, in case it had died in flight:
    # the server had it, so the device's history has it once.
    history = fleet.cli_json("events", "--device", agent.device_id(), "--limit", "300")
    v1_healthy = [e for e in history if e["target"] != V2 and e["stage"] == "healthy"]
    assert len(v1_healthy) == 1, v1_healthy
