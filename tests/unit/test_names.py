"""The naming rules the CLI, the agent and the server share (edgefleet.names): one rule, one refusal."""

from __future__ import annotations

import pytest

from edgefleet import names, selectors
from edgefleet.errors import InvalidRequestError


def test_names_follow_one_rule_for_every_side() -> None:
    assert names.check_name("model name", "digits-2.v1_a") == "digits-2.v1_a"
    assert selectors.check_name is names.check_name  # the server's import path is the same function
    for bad in ("", "-lead", "a b", "a\n", "a/b", "x" * 129, "\x1b[31m"):
        with pytest.raises(InvalidRequestError, match="bad model name"):
            names.check_name("model name", bad)


def test_text_that_is_not_utf8_is_refused_clearly_instead_of_crashing_protobuf() -> None:
    undecodable = b"cam\xff".decode("utf-8", "surrogateescape")
    with pytest.raises(InvalidRequestError, match=r"not valid UTF-8"):
        names.check_name("device name", undecodable)
    with pytest.raises(InvalidRequestError, match=r"not valid UTF-8"):
        selectors.parse_selector("group:" + undecodable)
    with pytest.raises(InvalidRequestError, match=r"not valid UTF-8"):
        names.check_utf8("text", "\ud800")


def test_the_agent_refuses_an_oversized_or_undecodable_name_at_start() -> None:
    from edgefleet.agent.__main__ import parse_args as agent_args

    for bad in ("n" * 300, b"cam\xff".decode("utf-8", "surrogateescape")):
        with pytest.raises(SystemExit) as exited:
            agent_args(["--name", bad])
        assert exited.value.code == 2
