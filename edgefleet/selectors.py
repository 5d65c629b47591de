"""Device selectors used by deploy, rollback and listings: `all`, `group:NAME`, `device:ID`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgefleet.errors import InvalidRequestError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # fullmatch: "$" would let a final "\n" in


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
    text = (text or "").strip()
    if text == "all":
        return Selector("all")
    kind, _, value = text.partition(":")
    if kind in ("group", "device") and _NAME.fullmatch(value):
        return Selector(kind, value)
    raise InvalidRequestError(f"bad selector {text!r}: use 'all', 'group:NAME' or 'device:ID'")


def check_name(what: str, value: str) -> str:
    """Names of models, versions, groups and devices: safe in paths, URLs and logs."""
    if not _NAME.fullmatch(value or ""):
        raise InvalidRequestError(
            f"bad {what} {value!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value
