"""Device labels: the key=value pairs an operator tags devices with (site=berlin, camera=v2), validated as
kubectl validates them, on both sides, with the same words.

- a key is 1-63 letters, digits, '.', '_' or '-', starting and ending with a letter or digit (kubectl's
  name part, without a DNS prefix);
- a value is empty or 1-63 of the same characters, starting and ending with a letter or digit;
- a device carries at most 64 labels.

`edits(["site=berlin", "camera-"])` reads what `edgefleet devices label` is given; `apply_edits` is the
rule that decides the device's new labels (a changed value needs `overwrite`, as `kubectl label` does).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from edgefleet.errors import ConflictError, InvalidRequestError
from edgefleet.names import check_utf8

MAX_LABELS = 64
MAX_LABEL_CHARS = 63
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?"
KEY = re.compile(_PART)
VALUE = re.compile(f"(?:{_PART})?")
KEY_RULE = "a label key is 1-63 letters, digits, '.', '_' or '-', starting and ending with a letter or digit"
VALUE_RULE = "a label value is empty or 1-63 letters, digits, '.', '_' or '-', starting and ending with a letter or digit"


def _shown(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:80] + "...")


def check_key(key: str) -> str:
    """Raises InvalidRequestError naming the rule."""
    check_utf8("label key", key)
    if not KEY.fullmatch(key):
        raise InvalidRequestError(f"bad label key {_shown(key)}: {KEY_RULE}")
    return key


def check_value(key: str, value: str) -> str:
    check_utf8("label value", value)
    if not VALUE.fullmatch(value):
        raise InvalidRequestError(f"bad value {_shown(value)} of label {key!r}: {VALUE_RULE}")
    return value


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """A copy of `labels` once every key and value passed and there are at most MAX_LABELS of them."""
    if len(labels) > MAX_LABELS:
        raise InvalidRequestError(f"{len(labels)} labels: a device carries at most {MAX_LABELS}")
    return {check_key(k): check_value(k, v) for k, v in labels.items()}


def parse_label(text: str) -> tuple[str, str]:
    """`key=value` -> (key, value). Raises InvalidRequestError saying the form."""
    key, eq, value = text.partition("=")
    if not eq:
        raise InvalidRequestError(f"bad label {_shown(text)}: write key=value (e.g. site=berlin)")
    return check_key(key), check_value(key, value)


@dataclass(frozen=True)
class LabelEdits:
    """What one `edgefleet devices label` asks: keys to set (to these values) and keys to remove."""

    set: Mapping[str, str]
    remove: tuple[str, ...] = ()


def edits(words: Iterable[str]) -> LabelEdits:
    """`site=berlin` sets, `camera-` removes (kubectl's forms). Raises InvalidRequestError for anything
    else, for a key both set and removed, or for one set twice."""
    to_set: dict[str, str] = {}
    remove: list[str] = []
    for word in words:
        if "=" not in word and word.endswith("-"):
            remove.append(check_key(word[:-1]))
            continue
        key, value = parse_label(word) if "=" in word else _not_an_edit(word)
        if key in to_set:
            raise InvalidRequestError(f"label {key!r} is given twice")
        to_set[key] = value
    both = sorted(set(to_set) & set(remove))
    if both:
        raise InvalidRequestError(f"label {both[0]!r} is both set and removed")
    if not to_set and not remove:
        raise InvalidRequestError("give labels to set (key=value) or to remove (key-)")
    return LabelEdits(to_set, tuple(dict.fromkeys(remove)))


def _not_an_edit(word: str) -> tuple[str, str]:
    raise InvalidRequestError(
        f"bad label {_shown(word)}: write key=value to set a label or key- to remove one"
    )


def apply_edits(current: Mapping[str, str], change: LabelEdits, overwrite: bool) -> dict[str, str]:
    """The labels after `change`. Raises ConflictError when a key would get another value without
    `overwrite` (nothing changes), InvalidRequestError past MAX_LABELS. Removing a missing key is no error."""
    changed = sorted(k for k, v in change.set.items() if k in current and current[k] != v)
    if changed and not overwrite:
        shown = ", ".join(f"{k}={current[k]}" for k in changed)
        raise ConflictError(
            f"the device already has {shown}: pass --overwrite to change {'it' if len(changed) == 1 else 'them'}"
        )
    result = {k: v for k, v in current.items() if k not in change.remove}
    result.update(change.set)
    if len(result) > MAX_LABELS:
        raise InvalidRequestError(
            f"that would give the device {len(result)} labels: it carries at most {MAX_LABELS}"
        )
    return result


def labels_text(labels: Mapping[str, str]) -> str:
    """`camera=v2,site=berlin` (sorted), as tables and logs show labels."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
