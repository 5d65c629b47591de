"""Device selectors used by deploy, rollback, listings and late joiners. Pure: parsing and matching only.

A selector is one of:

    all                       every device
    device:ID                 one device, by id (the server also accepts its name)
    REQ[,REQ...]              devices matching every requirement, where a requirement is
                              group:NAME            in group NAME (at most once)
                              key=value, key==value  has the label with that value
                              key!=value            has not (a device without the key matches)
                              key in (a,b)          has the key with one of these values
                              key notin (a,b)       has not (a device without the key matches)
                              key                   has the key
                              !key                  has not the key

e.g. `group:lab,site=berlin,camera!=v1` or `site in (berlin,paris)`. Requirements are ANDed, as in
kubectl; `all` stands alone (so a bare `all` is never read as "has the label all"), and a bare word is a
has-key requirement, as in kubectl: `edgefleet deploy ... --to everything` reaches the devices with that
label (none, usually, and an empty deployment is refused). `str(selector)` is the canonical text the server stores with a deployment (group first, then
the requirements in the order given) and parses again when a device enrolls later.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from edgefleet.errors import InvalidRequestError
from edgefleet.labels import KEY, KEY_RULE, VALUE, VALUE_RULE
from edgefleet.names import NAME, check_name, check_utf8

__all__ = ["Requirement", "Selector", "check_name", "parse_selector"]

MAX_SELECTOR_CHARS = 256  # the canonical text, as stored with a deployment
MAX_INPUT_CHARS = 1024  # what is parsed at all
MAX_REQUIREMENTS = 32
MAX_SET_VALUES = 32
FORMS = (
    "use 'all', 'device:ID', or a comma-separated list of 'group:NAME' and label requirements "
    "(key=value, key!=value, key in (a,b), key notin (a,b), key, !key), e.g. 'group:lab,site=berlin'"
)
_NO_LABELS: Mapping[str, str] = {}
_KEY = KEY.pattern
_VALUE = VALUE.pattern
_EQUALITY = re.compile(rf"\s*({_KEY})\s*(==|!=|=)\s*(\S*?)\s*")
_SET = re.compile(rf"\s*({_KEY})\s+(in|notin)\s*\((.*)\)\s*", re.DOTALL)
_EXISTS = re.compile(rf"\s*(!?)\s*({_KEY})\s*")
_GROUP = re.compile(r"\s*group:(.*?)\s*", re.DOTALL)
OPERATORS = ("=", "!=", "in", "notin", "exists", "!")


@dataclass(frozen=True)
class Requirement:
    """One label requirement: `operator` is one of OPERATORS; `values` holds one value for = and !=, the
    set for in and notin, nothing for exists and !."""

    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.operator == "exists":
            return value is not None
        if self.operator == "!":
            return value is None
        if self.operator in ("=", "in"):
            return value is not None and value in self.values
        return value is None or value not in self.values  # != and notin

    def __str__(self) -> str:
        if self.operator == "exists":
            return self.key
        if self.operator == "!":
            return f"!{self.key}"
        if self.operator in ("=", "!="):
            return f"{self.key}{self.operator}{self.values[0]}"
        return f"{self.key} {self.operator} ({','.join(self.values)})"


@dataclass(frozen=True)
class Selector:
    kind: str  # "all", "group" or "device"
    value: str = ""  # the group's name or the device's id
    requirements: tuple[Requirement, ...] = ()  # label requirements, all of which a device must meet

    def __str__(self) -> str:
        head = [] if self.kind == "all" else [f"{self.kind}:{self.value}"]
        return ",".join(head + [str(r) for r in self.requirements]) or "all"

    def matches(self, device_id: str, group: str, labels: Mapping[str, str] = _NO_LABELS) -> bool:
        if self.kind == "group" and group != self.value:
            return False
        if self.kind == "device" and device_id != self.value:
            return False
        return all(r.matches(labels) for r in self.requirements)


def _refuse(text: str, why: str) -> InvalidRequestError:
    shown = text if len(text) <= 80 else text[:80] + "..."
    return InvalidRequestError(f"bad selector {shown!r}: {why}; {FORMS}")


def parse_selector(text: str) -> Selector:
    """Raises InvalidRequestError, showing the valid forms, for anything else."""
    text = check_utf8("selector", (text or "").strip())
    if len(text) > MAX_INPUT_CHARS:
        raise _refuse(text, f"it is longer than {MAX_INPUT_CHARS} characters")
    if not text:
        raise _refuse(text, "it is empty")
    if text == "all":
        return Selector("all")
    if text.startswith("device:"):
        if NAME.fullmatch(text[len("device:") :]):
            return Selector("device", text[len("device:") :])
        raise _refuse(text, "device:ID takes one device id or name and no labels")
    group = ""
    requirements: list[Requirement] = []
    for part in _split(text):
        if part.strip() == "all":
            raise _refuse(text, "'all' stands alone (requirements already narrow every device)")
        found = _GROUP.fullmatch(part)
        if found:
            if group:
                raise _refuse(text, "it names more than one group")
            if not NAME.fullmatch(found.group(1)):
                raise _refuse(text, f"{found.group(1)!r} is not a group name")
            group = found.group(1)
        else:
            requirements.append(_requirement(text, part))
    if len(requirements) > MAX_REQUIREMENTS:
        raise _refuse(text, f"it has more than {MAX_REQUIREMENTS} label requirements")
    kind = "group" if group else "all"
    selector = Selector(kind, group, tuple(requirements))
    if len(str(selector)) > MAX_SELECTOR_CHARS:
        raise _refuse(text, f"it is longer than {MAX_SELECTOR_CHARS} characters")
    return selector


def _split(text: str) -> list[str]:
    """The comma-separated parts outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
            if depth > 1:
                raise _refuse(text, "parentheses do not nest")
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise _refuse(text, "a ')' has no '('")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise _refuse(text, "a '(' is not closed")
    parts.append(text[start:])
    if any(not p.strip() for p in parts):
        raise _refuse(text, "it has an empty part (two commas, or one at an end)")
    return parts


def _requirement(text: str, part: str) -> Requirement:
    found = _SET.fullmatch(part)
    if found:
        key, operator, inner = found.groups()
        values = [v.strip() for v in inner.split(",")]
        if not inner.strip():
            raise _refuse(text, f"'{key} {operator} ()' needs at least one value")
        if len(values) > MAX_SET_VALUES:
            raise _refuse(text, f"a set holds at most {MAX_SET_VALUES} values")
        if "" in values:
            raise _refuse(text, f"the set of {key!r} has an empty value (a comma too many?)")
        for value in values:
            _check_value(text, key, value)
        return Requirement(key, operator, tuple(dict.fromkeys(values)))
    found = _EQUALITY.fullmatch(part)
    if found:
        key, operator, value = found.groups()
        _check_value(text, key, value)
        return Requirement(key, "!=" if operator == "!=" else "=", (value,))
    found = _EXISTS.fullmatch(part)
    if found:
        negated, key = found.groups()
        return Requirement(key, "!" if negated else "exists")
    if ":" in part:
        raise _refuse(text, f"{part.strip()!r}: only group: and device: take a ':'")
    raise _refuse(text, f"{part.strip()!r} is not a label requirement ({KEY_RULE})")


def _check_value(text: str, key: str, value: str) -> None:
    if not VALUE.fullmatch(value):
        raise _refuse(text, f"{value!r} is not a value of label {key!r} ({VALUE_RULE})")
