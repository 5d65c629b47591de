"""The `rollout` commands' arguments, for cli.main's parser: kept apart from `rollouts` (which imports gRPC)
so that `edgefleet --help` stays fast."""

from __future__ import annotations

import argparse
import re
from datetime import datetime, timezone
from typing import Any

_DURATION = re.compile(r"^([0-9]{1,6})(s|m|h|d)?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def duration(text: str) -> float:
    """argparse type: `90`, `90s`, `10m`, `2h`, `1d` -> seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: write a number with s, m, h or d, e.g. 10m")
    return float(int(m.group(1)) * _UNITS[m.group(2)])


def window(text: str) -> tuple[str, float, bool]:
    """argparse type: `CRON;DURATION[;device-local]` (the server checks the cron expression)."""
    parts = [p.strip() for p in text.split(";")]
    if len(parts) == 3 and parts[2] not in ("device-local", "utc"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: the third part is 'utc' (the default) or 'device-local' (each device's own time "
            f"zone), not {parts[2]!r}; for one named zone, write its hours in UTC"
        )
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(
            f"{text!r}: write 'CRON;DURATION[;device-local]', e.g. '0 2 * * *;2h'"
        )
    return parts[0], duration(parts[1]), parts[2:] == ["device-local"]


def start_at(text: str) -> int:
    """argparse type: an ISO 8601 time (UTC unless it names its zone) -> unix ms."""
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write an ISO time, e.g. 2026-12-01T02:00:00Z") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return int(at.timestamp() * 1000)


def add_parsers(add: Any, group: Any, targets_key: Any, positive_seconds: Any) -> None:
    """The `rollout` commands, for cli.main's parser."""
    rollout = group("rollout", "staged rollouts: waves, gates, automatic abort and rollback")
    sp = add(
        "start", "rollouts:cmd_rollout_start", "start a staged rollout (signs its rollout permit first)",
        "edgefleet rollout start detector 3 --to group:lab --waves 5,10%,50%,100% --soak 10m --shadow-waves 1\n"
        "edgefleet rollout start detector 3 --to all --ramp 5,2,100 --gate latency.tolerance=1.3\n"
        "edgefleet rollout start detector 3 --to all --waves 10%,100% --window '0 2 * * *;2h;device-local'",
        rollout, listing=True,
    )  # fmt: skip
    sp.add_argument("name", help="the model")
    sp.add_argument("version")
    sp.add_argument(
        "--to", required=True, help="all, group:NAME, device:ID or labels (site=berlin,camera!=v1)"
    )
    sp.add_argument("--waves", default="", help="cumulative counts or percentages, e.g. 5,10%%,50%%,100%%")
    sp.add_argument("--ramp", default="", help="BASE,FACTOR,MAX_PER_MIN (exponential, rate-capped)")
    sp.add_argument("--soak", type=duration, default=600.0, help="how long each wave soaks (10m)")
    sp.add_argument("--min-devices", type=int, default=5, help="healthy devices a wave needs to be judged")
    sp.add_argument("--shadow-waves", type=int, default=0, help="how many first waves run in shadow")
    sp.add_argument(
        "--gate", action="append", default=[], help="GATE.FIELD=VALUE, e.g. latency.tolerance=1.2"
    )
    sp.add_argument(
        "--window", action="append", type=window, default=[], help="'CRON;DURATION[;device-local]'"
    )
    sp.add_argument("--start-at", type=start_at, default=0, help="ISO time to start at (default: now)")
    sp.add_argument("--id", default="", help="the rollout id to use (default: a new ro-...)")
    sp.add_argument("--rollout-name", default="", help="a name for people (default: the id)")
    sp.add_argument("--dry-run", action="store_true", help="print the plan; sign and start nothing")
    targets_key(sp, "signs the rollout permit")
    add(
        "list",
        "rollouts:cmd_rollout_list",
        "list rollouts",
        "edgefleet rollout list --json",
        rollout,
        listing=True,
    )
    sp = add(
        "status", "rollouts:cmd_rollout_status", "a rollout's waves, gates and timeline",
        "edgefleet rollout status ro-1a2b3c4d5e --watch || echo 'aborted (exit 3)'", rollout, listing=True,
    )  # fmt: skip
    sp.add_argument("id")
    sp.add_argument("--watch", action="store_true", help="refresh until it completes (0) or is aborted (3)")
    sp.add_argument("--interval", type=positive_seconds, default=2.0, help="seconds between refreshes")
    for verb, help in (
        ("pause", "stop advancing (devices mid-install carry on)"),
        ("resume", "carry on where it paused"),
        ("next", "promote the current wave now, whatever its gates say"),
        ("retry-failed", "have the current wave's failed devices try the candidate again (3 times at most)"),
        ("abort", "stop it and send the devices on the candidate back"),
    ):
        fn = f"rollouts:cmd_rollout_{verb.replace('-', '_')}"
        sp = add(verb, fn, help, f"edgefleet rollout {verb} ro-1a2b3c4d5e", rollout, listing=True)
        sp.add_argument("id")
        if verb == "abort":
            sp.add_argument("--no-rollback", action="store_true", help="leave updated devices where they are")
            sp.add_argument("--reason", default="", help="why, for the timeline and the audit log")
