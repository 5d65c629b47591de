"""Versions are immutable, and a re-push says what happened: the same bytes with the same inputs change
nothing (and say so), other bytes or another eval set are refused. The operator's CLI against a real server.
"""

from __future__ import annotations

import pytest

from edgefleet.cli.client import CliError
from edgefleet.devtools.localfleet import LocalFleet


def test_repushing_a_version_is_a_no_op_only_with_the_same_bytes_and_eval(
    fleet: LocalFleet, digits_files: dict
) -> None:
    push = ("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
    first = fleet.cli_json(*push)
    assert first["already_pushed"] is False
    again = fleet.cli_json(*push)
    assert again["already_pushed"] is True  # the retry after a failed signing step still works
    before = fleet.cli_json("model", "list")
    with pytest.raises(CliError) as other_eval:
        fleet.cli(*push, "--eval", str(digits_files["eval"]))
    assert "versions are immutable" in str(other_eval.value) and "eval" in str(other_eval.value)
    with pytest.raises(CliError) as other_bytes:
        fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "1")
    assert "versions are immutable" in str(other_bytes.value)
    assert fleet.cli_json("model", "list") == before
