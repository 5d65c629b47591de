"""The agent's durable state: what runs, what ran before, what is bad. Written atomically on every change,
so a kill at any instant leaves either the old or the new state file, never a mix.

Layout of the state folder:
    state.json           AgentState below
    credentials.json     device id and token (0600)
    metadata/            python-tuf's trusted metadata (the version floor against rollback attacks)
    models/<sha256>.tflite   verified model files: the current one and the previous one
    downloads/<sha256>.part  bytes on the wire so far (resumed from their length)
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.durable import write_atomic
from edgefleet.errors import InvalidRequestError
from edgefleet.values import ModelRef

log = logging.getLogger("edgefleet.agent")


def now_ms() -> int:
    """The device's clock, in ms since 1970: what the state file and every report record times in."""
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Pending:
    """An update between its activation and "healthy"."""

    target_path: str
    activated_ms: int = 0
    starts: int = 0  # agent starts during this probation (see decisions.gives_up_at_start)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"target_path": self.target_path, "activated_ms": self.activated_ms}
        if self.starts:  # written only once counted, as before: the file keeps its shape
            data["starts"] = self.starts
        return data

    @classmethod
    def from_json(cls, data: Any) -> Pending | None:
        if not data:
            return None
        try:
            return cls(str(data["target_path"]), int(data.get("activated_ms", 0)), int(data.get("starts", 0)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidRequestError(f"state file: malformed pending update: {e}") from e


@dataclass
class AgentState:
    current: ModelRef | None = None  # the running model
    previous: ModelRef | None = None  # kept on disk for rollback
    bad_targets: list[str] = field(default_factory=list)  # refused or failed: never tried again
    pending: Pending | None = None  # an update between activation and "healthy"
    status_sequence: int = 0  # of the last status report sent; the server ignores older ones
    floors: dict[str, int] = field(default_factory=dict)  # model name -> highest sequence installed
    rollbacks_done: list[str] = field(
        default_factory=list
    )  # command ids carried out (an order can arrive twice)
    # A shadow candidate's verified copy, kept by prune; never loaded at start (a shadow survives nothing:
    # it comes back only when the server still assigns it).
    shadow: ModelRef | None = None
    deferred_until_ms: int = 0  # an application asked: no install starts before this (local API)
    deferred_used_s: int = 0  # granted since the last install started (bounded per assignment)
    # target -> the retry-failed orders that lifted its bad mark (decisions.retry_lift bounds them)
    retries: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The state file's shape: the same keys as every earlier version wrote, and the newer ones only
        when set."""
        data: dict[str, Any] = {
            "current": self.current.to_json() if self.current else None,
            "previous": self.previous.to_json() if self.previous else None,
            "bad_targets": list(self.bad_targets),
            "pending": self.pending.to_json() if self.pending else None,
            "status_sequence": self.status_sequence,
            "floors": dict(self.floors),
            "rollbacks_done": list(self.rollbacks_done),
        }
        if self.shadow:
            data["shadow"] = self.shadow.to_json()
        if self.deferred_until_ms or self.deferred_used_s:
            data["deferred_until_ms"] = self.deferred_until_ms
            data["deferred_used_s"] = self.deferred_used_s
        if self.retries:
            data["retries"] = {target: list(orders) for target, orders in self.retries.items()}
        return data

    @classmethod
    def from_json(cls, data: Any) -> AgentState:
        """Raises InvalidRequestError for anything but the state file's shape with the right types."""
        if not isinstance(data, dict):
            raise InvalidRequestError(f"state file: not a JSON object but {type(data).__name__}")
        return cls(
            current=ModelRef.optional(data.get("current")),
            previous=ModelRef.optional(data.get("previous")),
            bad_targets=_strings(data, "bad_targets"),
            pending=Pending.from_json(data.get("pending")),
            status_sequence=_count(data.get("status_sequence", 0), "status_sequence"),
            floors=_floors(data.get("floors", {})),
            rollbacks_done=_strings(data, "rollbacks_done"),
            shadow=ModelRef.optional(data.get("shadow")),
            deferred_until_ms=_count(data.get("deferred_until_ms", 0), "deferred_until_ms"),
            deferred_used_s=_count(data.get("deferred_used_s", 0), "deferred_used_s"),
            retries=_retries(data.get("retries", {})),
        )


def _strings(data: dict[str, Any], key: str) -> list[str]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequestError(f"state file: {key} is not a list of strings")
    return list(value)


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"state file: {what} is not a count")
    return value


def _floors(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise InvalidRequestError("state file: floors is not an object")
    return {str(k): _count(v, f"the floor of {k}") for k, v in value.items()}


def _retries(value: Any) -> dict[str, list[str]]:
    if not isinstance(value, dict):
        raise InvalidRequestError("state file: retries is not an object")
    return {str(k): _strings(value, k) for k in value}


def _move_aside(path: Path) -> Path:
    """Keeps a damaged file for a post-mortem, out of the agent's way: <name>.damaged-<UTC time>."""
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    os.replace(path, aside)
    return aside


class StateStore:
    """The state folder, and the one live `AgentState` every part of the agent reads and changes: `save()`
    writes it; `commit(new)` writes a replacement and only then adopts it (a failed write changes nothing)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        for sub in ("models", "downloads", "metadata"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        self.damaged = False  # the state file was damaged at load (moved aside, started clean)
        self.state = self.load()

    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    def load(self) -> AgentState:
        """The state file; a damaged one (truncated, empty, garbage, wrong types or shape) is moved aside with
        one log line and the agent starts clean (`damaged` tells the supervisor to rebuild what it can from
        the verified local models). Never raises for what is in the file."""
        if not self.state_path.exists():
            return AgentState()
        try:
            return AgentState.from_json(json.loads(self.state_path.read_bytes()))
        # JSON and UTF-8 errors are ValueErrors; the others are a value of the wrong type somewhere.
        except (ValueError, TypeError, KeyError, AttributeError, InvalidRequestError, RecursionError) as e:
            aside = _move_aside(self.state_path)
            log.error(
                "state file damaged (%s): moved to %s; starting from the verified models on disk",
                str(e)[:200],
                aside.name,
            )
            self.damaged = True
            return AgentState()

    def save(self) -> None:
        write_atomic(self.state_path, json.dumps(self.state.to_json(), indent=1, sort_keys=True).encode())

    def commit(self, new_state: AgentState) -> None:
        write_atomic(self.state_path, json.dumps(new_state.to_json(), indent=1, sort_keys=True).encode())
        self.state = new_state

    def load_credentials(self) -> dict[str, str] | None:
        """The device's id and token; None when there are none, or when the file is damaged (then moved
        aside, with one log line that says to enroll again)."""
        path = self.folder / "credentials.json"
        if not path.exists():
            return None
        try:
            creds = json.loads(path.read_bytes())
            if not isinstance(creds, dict) or not all(isinstance(v, str) for v in creds.values()):
                raise ValueError("not an object of strings")
            if not creds.get("device_id"):
                raise ValueError("no device id")
        except (ValueError, RecursionError) as e:
            aside = _move_aside(path)
            log.error(
                "credentials file damaged (%s): moved to %s; this device must enroll again (--enroll-token)",
                str(e)[:200],
                aside.name,
            )
            return None
        return {str(k): v for k, v in creds.items()}

    def save_credentials(self, creds: dict[str, str]) -> None:
        write_atomic(self.folder / "credentials.json", json.dumps(creds).encode(), mode=0o600)

    def model_path(self, sha256: str) -> Path:
        return self.folder / "models" / f"{sha256}.tflite"

    def download_path(self, sha256: str) -> Path:
        return self.folder / "downloads" / f"{sha256}.part"

    def prune_models(self, keep: set[str]) -> None:
        """Deletes model files that are neither current nor previous."""
        for path in (self.folder / "models").iterdir():
            if path.name.split(".")[0] not in keep:  # <sha>.tflite and <sha>.target.json
                path.unlink(missing_ok=True)
        for path in (self.folder / "downloads").glob("*.part"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)
