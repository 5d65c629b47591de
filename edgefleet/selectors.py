"""Device selectors used by deploy, rollback and listings: `all`, `group:NAME`, `device:ID`."""

from __future__ import annotations

from dataclasses import dataclass

from edgefleet.errors import InvalidRequestError
from edgefleet.names import NAME, check_name, check_utf8

__all__ = ["Selector", "check_name", "parse_selector"]


@dataclass(frozen=True)
class Selector:
    kind: str  # "all", "group" or "device"
    value: str = ""

    def __str__(self) -> str:
        return "all" if self.kind == "all" else f"{self.kind}:{self.value}"

    def matches(self, device_id: str, group: str) -> bool:
        if self.kind == "all":
            return True
        if self.kind == "group":
            return group == self.value
        return device_id == self.value


def parse_selector(text: str) -> Selector:
    """Raises InvalidRequestError for anything but `all`, `group:NAME` or `device:ID`."""
    text = check_utf8("selector", (text or "").strip())
    if text == "all":
        return Selector("all")
    kind, _, value = text.partition(":")
    if kind in ("group", "device") and NAME.fullmatch(value):
        return Selector(kind, value)
    raise InvalidRequestError(f"bad selector {text!r}: use 'all', 'group:NAME' or 'device:ID'")
