"""Logging for the long-running processes (the server, the agent): one line per event, levels that mean
something, text or JSON, and the libraries' chatter kept out unless asked for.

    setup_logging(verbose, "text" | "json")   called once, at the edge (`__main__`, `server.main`)

JSON lines carry `time` (RFC 3339, UTC), `level`, `logger`, `message`, `exc` (a traceback, when there is one)
and any `extra={...}` fields the call passed, so a log shipper needs no parsing rules.
"""

from __future__ import annotations

import datetime
import json
import logging

FORMATS = ("text", "json")
# Libraries that log at INFO about their own routine work (python-tuf's every refresh, apscheduler's every
# job run): WARNING and above unless -v.
_CHATTY = ("tuf", "securesystemslib", "apscheduler", "urllib3", "asyncio")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup_logging(verbose: bool = False, fmt: str = "text") -> None:
    """Configures the root logger once for this process. Raises ValueError for an unknown `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
