"""The naming rules both sides apply: what a model, version, variant, group or device name may be.

One module so that the CLI and the agent refuse a bad name before any request with the very words the
server would use (`InvalidRequestError`), instead of sending it and reading a transport error. Text from a
command line that is not valid UTF-8 arrives in Python as lone surrogates ("surrogateescape"); protobuf
cannot encode those, so it is refused here, clearly, rather than crashing the encoder with a traceback.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

from edgefleet.errors import InvalidRequestError

MAX_NAME_CHARS = 128
# fullmatch: "$" would let a final "\n" in.
NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_CHARS - 1}}}")
NAME_RULE = f"use 1-{MAX_NAME_CHARS} letters, digits, '.', '_' or '-', starting with a letter or digit"


def check_utf8(what: str, value: str) -> str:
    """Refuses text that cannot be sent as UTF-8 (lone surrogates from undecodable bytes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        try:
            shown = repr(value.encode("utf-8", "surrogateescape"))[1:]  # the bytes as typed: 'a\xff'
        except UnicodeEncodeError:
            shown = ascii(value)
        raise InvalidRequestError(f"bad {what} {shown}: it is not valid UTF-8") from e
    return value


def check_name(what: str, value: str) -> str:
    """Names of models, versions, variants, groups and devices: safe in paths, URLs and logs.
    Raises InvalidRequestError naming `what` and the rule."""
    check_utf8(what, value or "")
    if not NAME.fullmatch(value or ""):
        shown = value if len(value or "") <= MAX_NAME_CHARS + 8 else f"{value[:MAX_NAME_CHARS]}..."
        raise InvalidRequestError(f"bad {what} {shown!r}: {NAME_RULE}")
    return value


def argument(what: str) -> Callable[[str], str]:
    """An argparse `type=` that applies `check_name`: a bad name is a usage error (exit 2) with the rule."""

    def parse(value: str) -> str:
        try:
            return check_name(what, value)
        except InvalidRequestError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    return parse
