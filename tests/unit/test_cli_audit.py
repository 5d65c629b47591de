"""`edgefleet audit --since`: durations ago and ISO times, and what a bad one says."""

from __future__ import annotations

import pytest

from edgefleet.cli.commands.audit import since_ms
from edgefleet.cli.exits import UsageError

NOW_S = 1_800_000_000.0


@pytest.mark.parametrize(
    ("text", "expected_ms"),
    [
        ("45s", (NOW_S - 45) * 1000),
        ("30m", (NOW_S - 1800) * 1000),
        ("1h", (NOW_S - 3600) * 1000),
        ("2d", (NOW_S - 2 * 86400) * 1000),
        ("2026-12-01T10:00:00Z", 1_796_119_200_000),
        ("2026-12-01T10:00:00", 1_796_119_200_000),  # no offset: UTC
        ("2026-12-01T11:00:00+01:00", 1_796_119_200_000),
        ("999999999d", 0),
    ],
)
def test_since_reads_durations_ago_and_iso_times(text: str, expected_ms: float) -> None:
    assert since_ms(text, NOW_S) == int(expected_ms)


@pytest.mark.parametrize("text", ["yesterday", "1w", "-1h", "1.5h", "2026-13-01", ""])
def test_a_bad_since_says_the_forms(text: str) -> None:
    with pytest.raises(UsageError, match="30m, 1h, 2d"):
        since_ms(text, NOW_S)
