"""How the CLI prints: device text escaped in every table cell, exact in JSON; times as RFC 3339 UTC."""

from __future__ import annotations

import json

import pytest

from edgefleet.cli.output import Column, escape, print_json_line, print_table, rfc3339, when


def test_escape_makes_every_control_character_visible() -> None:
    assert escape("cam-1 ok") == "cam-1 ok"
    assert escape("\x1b[31mred\x1b[0m") == "\\x1b[31mred\\x1b[0m"
    assert escape("a\nb\rc\td\x00\x7f\x9b\u202e") == "a\\nb\\rc\\td\\x00\\x7f\\x9b\\u202e"
    assert all(ch.isprintable() for ch in escape("".join(map(chr, range(0x110)))))


def test_tables_escape_cells_and_json_lines_keep_the_text(capsys: pytest.CaptureFixture[str]) -> None:
    print_table([{"reason": "\x1b]0;owned\x07"}], [Column("reason")])
    print_json_line({"reason": "\x1b]0;owned\x07", "n": 3})
    table, line = capsys.readouterr().out.splitlines()[1:]
    assert "\x1b" not in table and "\\x1b]0;owned\\x07" in table
    assert "\x1b" not in line and json.loads(line) == {"reason": "\x1b]0;owned\x07", "n": 3}


def test_times_are_rfc3339_utc_and_unset_is_null() -> None:
    assert rfc3339(1_796_119_200_000) == "2026-12-01T10:00:00Z"
    assert rfc3339(1_796_119_200_123) == "2026-12-01T10:00:00.123Z"
    assert rfc3339(0) is None and when(None) == "-"
    assert when("2026-12-01T10:00:00Z").startswith("2026-12-01")


def test_an_empty_table_says_what_was_asked_and_escapes_it(capsys: pytest.CaptureFixture[str]) -> None:
    print_table([], [Column("at")], escape("(no update events from device cam\x1b yet)"))
    assert capsys.readouterr().out == "(no update events from device cam\\x1b yet)\n"
