"""Two orders never steer one device, through the real CLI, a real server process and real agents: while a
rollout runs, another rollout or a plain deploy that would move its devices is refused (saying which rollout
and what to do) and a rollback still goes through, pausing it; a plan whose every wave is a shadow one is
refused; and a device that enrolls after a completed rollout is not taken by it when the operator deployed
something newer since."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgefleet.cli.exits import CliError
from edgefleet.devtools.localfleet import LocalFleet, wait_for
from edgefleet.devtools.modelgen import build_digits_model

V2 = "digits/2/float32.tflite"
V3 = "digits/3/float32.tflite"
QUICK = ["--soak", "1s", "--min-devices", "1", "--gate=install-failures.min_finished_devices=1"]


def rollout_ids(fleet: LocalFleet) -> dict[str, str]:
    return {r["id"]: r["state"] for r in fleet.cli_json("rollout", "list")}


def test_a_running_rollout_keeps_its_devices_and_a_later_deploy_keeps_late_joiners(
    fleet: LocalFleet, digits_files: dict[str, Path], tmp_path: Path
) -> None:
    v3, _ = build_digits_model(seed=2)
    (tmp_path / "v3.tflite").write_bytes(v3)
    token = fleet.enrollment_token(uses=2)
    cam = fleet.start_agent("cam-1", token)
    for version, path in (
        ("1", digits_files["v1"]),
        ("2", digits_files["v2"]),
        ("3", tmp_path / "v3.tflite"),
    ):
        fleet.cli("model", "push", str(path), "--name", "digits", "--version", version)
    fleet.cli("deploy", "digits", "1", "--to", "all")

    with pytest.raises(CliError, match="leave none of the 1 waves over 1 devices to serve digits 2"):
        fleet.cli("rollout", "start", "digits", "2", "--to", "all", "--waves", "1", "--shadow-waves", "1")

    # A rollout that soaks for an hour holds cam-1 (as a member) until it ends.
    held = fleet.cli_json("rollout", "start", "digits", "2", "--to", "all", "--waves", "1", "--soak", "1h")
    held_id = held["id"]
    for attempt in (
        ("rollout", "start", "digits", "3", "--to", "all", "--waves", "1"),
        ("deploy", "digits", "3", "--to", "group:default"),
    ):
        with pytest.raises(CliError) as refused:
            fleet.cli(*attempt)
        message = str(refused.value)
        assert refused.value.exit_code == 1, message
        assert f"rollout {held_id} (cam-1)" in message and f"rollout abort {held_id}" in message
    assert set(rollout_ids(fleet)) == {held_id}  # the refused one left nothing behind
    fleet.wait_running(cam, V2)
    fleet.cli("rollback", "--to", "all", "--reason", "an operator's way out is never refused")
    fleet.wait_running(cam, "digits/1/float32.tflite")
    assert rollout_ids(fleet)[held_id] == "paused"  # its later waves would undo the rollback: it waits
    fleet.cli("rollout", "abort", held_id, "--no-rollback")

    # A rollout that completes, then a newer plain deploy: a device enrolling now gets the deploy's version.
    done = fleet.cli_json("rollout", "start", "digits", "2", "--to", "all", "--waves", "1", *QUICK)
    wait_for(lambda: rollout_ids(fleet)[done["id"]] == "completed", 60, "the rollout to complete")
    fleet.wait_running(cam, V2)
    fleet.cli("deploy", "digits", "3", "--to", "all")
    fleet.wait_running(cam, V3)
    late = fleet.start_agent("cam-2", token)
    fleet.wait_running(late, V3)
    time.sleep(3)  # three engine ticks: time for the completed rollout to take cam-2, were it going to
    timeline = [e["what"] for e in fleet.cli_json("rollout", "status", done["id"])["timeline"]]
    assert not any("late joiner" in what for what in timeline), timeline
    assert fleet.device(late)["desired"]["target_path"] == V3
