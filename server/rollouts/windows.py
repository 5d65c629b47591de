"""Maintenance windows: a cron expression (when a window opens) and a duration (how long it stays open),
evaluated in UTC or in each device's own time zone (`Capabilities.timezone`, "" = UTC).

Built on apscheduler's CronTrigger (standard 5-field crontab syntax), never a hand-written cron parser: a
window is open at `t` when the trigger fires somewhere in (t - duration, t]. Outside every window of a
rollout no wave advances and no device is sent an install; with no windows the rollout runs any time.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

from edgefleet.errors import InvalidRequestError

UTC = dt.timezone.utc
_DURATION = re.compile(r"^([0-9]{1,6})(s|m|h|d)?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str, what: str = "duration") -> float:
    """`90`, `90s`, `10m`, `2h`, `1d` -> seconds. Raises InvalidRequestError."""
    m = _DURATION.match((text or "").strip())
    if not m:
        raise InvalidRequestError(f"{what} {text!r}: write a number with s, m, h or d, e.g. '10m'")
    return float(int(m.group(1)) * _UNITS[m.group(2)])


@dataclass(frozen=True)
class MaintenanceWindow:
    cron: str  # 5-field crontab: minute hour day month weekday
    duration_s: float
    device_local: bool = False  # evaluate in the device's time zone instead of UTC

    def __post_init__(self) -> None:
        if not 0 < self.duration_s <= 7 * 86400:
            raise InvalidRequestError(f"window duration must be in (0 s, 7 d], not {self.duration_s:g} s")
        self.trigger("UTC")  # refuses a bad expression now, not when a wave waits on it

    def __str__(self) -> str:
        return f"{self.cron};{int(self.duration_s)}s" + (";device-local" if self.device_local else "")

    def trigger(self, timezone: str) -> CronTrigger:
        try:
            return CronTrigger.from_crontab(self.cron, timezone=zone(timezone))
        except ValueError as e:
            raise InvalidRequestError(
                f"window {self.cron!r}: {e}; write a 5-field crontab such as '0 2 * * *'"
            ) from None

    def is_open(self, at: dt.datetime, timezone: str = "") -> bool:
        """Whether the window is open at `at` (aware), in `timezone` when device-local, else in UTC."""
        trigger = self.trigger(timezone if self.device_local else "")
        opened_after = at - dt.timedelta(seconds=self.duration_s)
        fire = trigger.get_next_fire_time(None, opened_after)
        return fire is not None and fire <= at

    def next_open(self, at: dt.datetime, timezone: str = "") -> dt.datetime | None:
        """When the window next opens after `at` (None: never, e.g. '0 0 30 2 *')."""
        fire: dt.datetime | None = self.trigger(timezone if self.device_local else "").get_next_fire_time(
            None, at
        )
        return fire

    def check_opens(self, at: dt.datetime) -> MaintenanceWindow:
        """Refuses a window that never opens (a rollout would wait on it for ever). Raises InvalidRequestError."""
        if self.next_open(at) is None:
            raise InvalidRequestError(
                f"window {self.cron!r} never opens (no such date, e.g. 30 February); "
                "write a day and month that exist, such as '0 2 * * *'"
            )
        return self


def zone(name: str) -> dt.tzinfo:
    """A time zone by IANA name; "" (and an unknown name, from a device) is UTC."""
    if not name or name == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


def parse_window(text: str) -> MaintenanceWindow:
    """`CRON;DURATION[;device-local]`, e.g. `0 2 * * *;2h;device-local`. Raises InvalidRequestError."""
    parts = [p.strip() for p in (text or "").split(";")]
    if len(parts) == 3 and parts[2] not in ("device-local", "utc"):
        raise InvalidRequestError(
            f"window {text!r}: the third part is 'utc' (the default) or 'device-local' (each device's own "
            f"time zone), not {parts[2]!r}; for one named zone, write its hours in UTC"
        )
    if len(parts) not in (2, 3):
        raise InvalidRequestError(
            f"window {text!r}: write 'CRON;DURATION[;device-local]', e.g. '0 2 * * *;2h;device-local'"
        )
    return MaintenanceWindow(
        parts[0], parse_duration(parts[1], "window duration"), len(parts) == 3 and parts[2] == "device-local"
    )


def open_now(windows: Sequence[MaintenanceWindow], at: dt.datetime, timezone: str = "") -> bool:
    """True with no windows, else whether any of them is open at `at` for a device in `timezone`."""
    return not windows or any(w.is_open(at, timezone) for w in windows)


def any_device_local(windows: Sequence[MaintenanceWindow]) -> bool:
    return any(w.device_local for w in windows)


def utc_open(windows: Sequence[MaintenanceWindow], at: dt.datetime) -> bool:
    """Whether the rollout may advance now: its UTC windows (device-local ones hold devices, not waves)."""
    utc = [w for w in windows if not w.device_local]
    return not utc or any(w.is_open(at) for w in utc)


def utc_waiting(windows: Sequence[MaintenanceWindow], at: dt.datetime) -> str:
    """Why a rollout whose UTC windows are all closed waits, for its timeline."""
    opens = [o for w in windows if not w.device_local and (o := w.next_open(at)) is not None]
    when = min(opens).strftime("%Y-%m-%dT%H:%M:%SZ") if opens else "never"
    return f"waiting for a maintenance window (UTC): the next opens at {when}"


def local_waiting(wave: int, zones: Counter[str]) -> str:
    """Why members of a wave are not sent the candidate: their own window is closed ("" = UTC)."""
    counted = sorted(zones.items(), key=lambda kv: (-kv[1], kv[0]))
    by_zone = ", ".join(f"{_label(name)} {n}" for name, n in counted[:8])
    more = ", ..." if len(zones) > 8 else ""
    return (
        f"wave {wave}: {sum(zones.values())} devices wait for their maintenance window, closed in their "
        f"own time zone ({by_zone}{more})"
    )


def _label(name: str) -> str:
    """A device's zone as the operator should read it: one the server does not know counts as UTC."""
    if not name or name == "UTC":
        return "UTC"
    shown = name[:64]
    return shown if zone(name) is not UTC else f"{shown!r} (unknown zone: read as UTC)"
