"""A deploy or rollback that fails leaves no signed trace: the server checks the whole command (selector,
model, version, variant, that it reaches a device) before the CLI signs anything or the server records it.

Attack from outside: the operator's own CLI against a real server, with a downgrade that would need a signed
permission; what the server stored (targets.json's version, the deployments) is read from its database.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from edgefleet.cli.client import CliError
from edgefleet.devtools.localfleet import LocalFleet


def _signed_trace(fleet: LocalFleet) -> tuple[int, int, bytes]:
    """targets.json's version, how many deployments exist, and the newest targets.json itself."""
    db = sqlite3.connect(fleet.data_dir / "fleet.db")
    try:
        (targets,) = db.execute("SELECT targets FROM repo_versions").fetchone()
        (deployments,) = db.execute("SELECT count(*) FROM deployments").fetchone()
        (content,) = db.execute(
            "SELECT content FROM metadata_files WHERE name = ?", (f"{targets}.targets",)
        ).fetchone()
        return int(targets), int(deployments), bytes(content)
    finally:
        db.close()


def _with_two_versions(fleet: LocalFleet, digits_files: dict) -> LocalFleet:
    fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    fleet.start_agent("cam", fleet.enrollment_token(group="lab"))
    return fleet


@pytest.fixture
def two_versions(fleet: LocalFleet, digits_files: dict) -> LocalFleet:
    return _with_two_versions(fleet, digits_files)


@pytest.fixture(scope="module")
def two_versions_for_refusals(
    tmp_path_factory: pytest.TempPathFactory, digits_files: dict
) -> Iterator[LocalFleet]:
    """One fleet for all the refusals below (a server and an agent per case cost more than the cases):
    each case asserts that its own command changed nothing signed or recorded, so none hands the next a
    different fleet. A test that changes the fleet takes `two_versions`, a fleet of its own."""
    fleet = LocalFleet(tmp_path_factory.mktemp("refusals") / "fleet")
    fleet.init_keys()
    fleet.start_server()
    try:
        yield _with_two_versions(fleet, digits_files)
    finally:
        fleet.close()


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (("deploy", "digits", "1", "--to", "lab"), "selector"),  # has the label "lab": no device has
        (("deploy", "digits", "1", "--to", "group:nobody"), "reaches no device"),
        (("deploy", "digits", "1", "--to", "group:lab", "--variant", "nope"), "no signed variant"),
        (("deploy", "digits", "9", "--to", "group:lab"), "9"),
        (("rollback", "--to", "group:lab,"), "selector"),
        (("rollback", "--to", "group:nobody"), "reaches no device that can go back"),
        (("rollback", "--to", "group:lab"), "has no previous model"),  # cam has run nothing yet
    ],
)
def test_a_failed_downgrade_command_signs_and_records_nothing(
    two_versions_for_refusals: LocalFleet, command: tuple[str, ...], says: str
) -> None:
    fleet = two_versions_for_refusals
    before = _signed_trace(fleet)
    with pytest.raises(CliError) as refused:
        fleet.cli(*command)
    assert says in str(refused.value)
    assert _signed_trace(fleet) == before


def test_a_deployment_that_reaches_no_device_needs_allow_empty(two_versions: LocalFleet) -> None:
    fleet = two_versions
    out = fleet.cli("deploy", "digits", "2", "--to", "group:later", "--allow-empty")
    assert "reaches no device yet" in out and "0 device(s)" in out
    assert _signed_trace(fleet)[1] == 1
