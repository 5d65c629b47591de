"""Maintenance windows beyond the happy path: a device whose time zone is missing or unknown is judged in
UTC (never held for ever, never evaluated in some other zone), a window that never opens is refused before
a rollout waits on it, the timeline's reasons name the zones, and the agent refuses a --timezone it cannot
load (exit 2) instead of reporting a zone the server would read as UTC."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import pytest

from edgefleet.agent.__main__ import parse_args as agent_args
from edgefleet.errors import InvalidRequestError
from edgefleet.server.rollouts.windows import local_waiting, open_now, parse_window, utc_waiting

UTC = dt.timezone.utc
UNKNOWN = ("", "UTC", "Mars/Olympus_Mons", "../../etc/passwd", "zone.tab", "Etc", "x" * 5000, "\x00")


def test_a_missing_or_unknown_device_zone_is_utc() -> None:
    local = [parse_window("0 2 * * *;1h;device-local")]
    open_in_utc = dt.datetime(2026, 7, 1, 2, 30, tzinfo=UTC)
    closed_in_utc = dt.datetime(2026, 7, 1, 3, 30, tzinfo=UTC)
    for name in UNKNOWN:
        assert open_now(local, open_in_utc, name), name
        assert not open_now(local, closed_in_utc, name), name
    # A real zone is not UTC: 02:30 UTC is 04:30 in Berlin in July (summer time), 03:30 UTC is 05:30.
    assert not open_now(local, open_in_utc, "Europe/Berlin")
    assert open_now(local, dt.datetime(2026, 7, 1, 0, 30, tzinfo=UTC), "Europe/Berlin")


def test_a_window_that_never_opens_is_refused_with_what_to_write() -> None:
    now = dt.datetime(2026, 12, 1, tzinfo=UTC)
    for cron in ("0 0 30 2 *", "0 0 31 4 *"):
        with pytest.raises(InvalidRequestError, match="never opens"):
            parse_window(f"{cron};1h").check_opens(now)
    assert parse_window("0 0 29 2 *;1h").check_opens(now).next_open(now) == dt.datetime(
        2028, 2, 29, tzinfo=UTC
    )
    with pytest.raises(InvalidRequestError, match="'device-local'.*not 'Europe/Berlin'"):
        parse_window("0 2 * * *;1h;Europe/Berlin")


def test_the_timeline_says_when_a_utc_window_opens_and_which_zones_wait() -> None:
    nightly = [
        parse_window("0 2 * * *;1h"),
        parse_window("30 23 * * *;10m"),
        parse_window("0 4 * * *;1h;device-local"),
    ]
    at = dt.datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert utc_waiting(nightly, at).endswith("the next opens at 2026-12-01T23:30:00Z")
    text = local_waiting(2, Counter({"Etc/GMT-3": 8, "": 3, "Mars/Olympus_Mons": 2}))
    assert text.startswith("wave 2: 13 devices wait for their maintenance window")
    assert "Etc/GMT-3 8, UTC 3, 'Mars/Olympus_Mons' (unknown zone: read as UTC) 2" in text


def test_the_agent_refuses_a_time_zone_it_cannot_load() -> None:
    for bad in ("Mars/Olympus_Mons", "Europe/Berlln", "../etc/passwd"):
        with pytest.raises(SystemExit) as exited:
            agent_args(["--timezone", bad])
        assert exited.value.code == 2, bad
    assert agent_args(["--timezone", "Etc/GMT-3"]).timezone == "Etc/GMT-3"
