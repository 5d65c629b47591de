"""What a selector was last told (deploy or rollback) is what a device joining it later gets.

Real server and agents: a group rolled back from v2 to v1, then a new device enrolled into the group.
"""

from __future__ import annotations

from edgefleet.devtools.localfleet import LocalFleet

V1 = "digits/1/float32.tflite"
V2 = "digits/2/float32.tflite"


def test_a_device_joining_a_rolled_back_group_gets_the_version_it_was_sent_back_to(
    fleet: LocalFleet, digits_files: dict
) -> None:
    token = fleet.enrollment_token(group="lab", uses=2)
    first = fleet.start_agent("cam-1", token)
    fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    fleet.cli("deploy", "digits", "1", "--to", "group:lab")
    fleet.wait_running(first, V1)
    fleet.cli("deploy", "digits", "2", "--to", "group:lab")
    fleet.wait_running(first, V2)
    fleet.cli("rollback", "--to", "group:lab")
    fleet.wait_running(first, V1)

    late = fleet.start_agent("cam-2", token)
    fleet.wait_running(late, V1)
    assert fleet.device(late)["desired"]["version"] == "1"  # not the v2 the group was rolled back from
