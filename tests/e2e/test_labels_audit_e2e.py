"""Labels and the audit log end to end: a real server process, real agents and the real CLI.

Devices enroll with a labelled token, the operator labels another, a version is deployed to a label
selector and reaches exactly the devices that match (a later one included); the audit log lists every
step under the operator's certificate name, its table escapes what an operator typed, and
`edgefleet audit --verify` notices a row changed behind the server's back."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgefleet.cli.exits import CliError
from edgefleet.devtools.localfleet import LocalFleet

V1 = "digits/1/float32.tflite"
V2 = "digits/2/float32.tflite"


def test_a_label_selector_deploys_to_matching_devices_and_the_audit_log_records_it(
    fleet: LocalFleet, digits_files: dict[str, Path]
) -> None:
    berlin = fleet.cli_json("token", "create", "--group", "lab", "--uses", "2", "--label", "site=berlin")
    assert berlin["labels"] == {"site": "berlin"}
    first = fleet.start_agent("cam-1", berlin["token"])
    other = fleet.start_agent("cam-2", fleet.enrollment_token(group="lab"))
    assert "site=paris" in fleet.cli("devices", "label", "cam-2", "site=paris", "camera=v2")
    with pytest.raises(CliError, match="--overwrite") as refused:
        fleet.cli("devices", "label", "cam-2", "site=berlin")
    assert refused.value.exit_code == 1
    with pytest.raises(CliError, match="key=value") as usage:
        fleet.cli("devices", "label", "cam-2", "site")
    assert usage.value.exit_code == 2

    fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
    fleet.cli("deploy", "digits", "1", "--to", "site=berlin,camera!=v2")
    fleet.wait_running(first, V1)
    late = fleet.start_agent("cam-3", berlin["token"])  # enrolls later and matches: gets v1
    fleet.wait_running(late, V1)
    listed = {d["name"]: d for d in fleet.cli_json("devices", "--to", "site in (berlin)")}
    assert set(listed) == {"cam-1", "cam-3"} and listed["cam-1"]["labels"] == {"site": "berlin"}
    assert fleet.device(other)["desired"] is None
    assert "camera=v2,site=paris" in fleet.cli("devices")
    # A rollback needs devices that ran a version before this one (one that reaches none is refused).
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    fleet.cli("deploy", "digits", "2", "--to", "site=berlin,camera!=v2")
    fleet.wait_running(first, V2)
    fleet.wait_running(late, V2)
    fleet.cli("rollback", "--to", "site=berlin", "--reason", "bad \x1b[2J frames")

    entries = fleet.cli_json("audit")
    actions = [e["action"] for e in entries]
    assert actions == [
        "token.create",
        "token.create",
        "device.label",
        "model.push",
        "targets.publish",
        "deployment.create",
        "model.push",
        "targets.publish",
        "deployment.create",
        "targets.publish",  # the permission to go back to v1, signed by the CLI before it orders the rollback
        "deployment.rollback",
    ]
    assert {e["actor"] for e in entries} == {"operator"}
    push, publish = entries[3], entries[4]
    assert push["subject"] == V1 and push["details"]["version"] == "1"
    assert publish["details"]["targets_version"] >= 1 and V1 in publish["details"]["targets"]
    assert len(publish["details"]["signed_by"]) == 1
    assert entries[5]["details"]["selector"] == "site=berlin,camera!=v2"
    assert entries[-1]["details"]["reason"] == "bad \x1b[2J frames"  # JSON keeps it exact
    table = fleet.cli("audit", "--action", "deployment")
    assert "2J frames" in table and "\x1b" not in table and "token.create" not in table
    assert [e["action"] for e in fleet.cli_json("audit", "--since", "1h", "--action", "token")] == [
        "token.create",
        "token.create",
    ]
    assert "intact: 11 entries" in fleet.cli("audit", "--verify")

    with sqlite3.connect(fleet.data_dir / "fleet.db") as db:  # someone edits the database directly
        db.execute("UPDATE audit_log SET actor = 'nobody' WHERE seq = 3")
    with pytest.raises(CliError, match="entry 3 was changed") as tampered:
        fleet.cli("audit", "--verify")
    assert tampered.value.exit_code == 1


def test_bad_audit_and_label_arguments_are_usage_errors(fleet: LocalFleet) -> None:
    for argv in (
        ("audit", "--since", "yesterday"),
        ("audit", "--action", "Deploy!"),
        ("audit", "--limit", "0"),
        ("token", "create", "--label", "site"),
        ("token", "create", "--label", "a=1", "--label", "a=2"),
        ("devices", "--to", "site in (a"),
    ):
        with pytest.raises(CliError) as refused:
            fleet.cli(*argv)
        assert refused.value.exit_code == 2, argv
