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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.durable import write_atomic


@dataclass
class AgentState:
    current: dict[str, Any] | None = None  # ModelRef fields of the running model
    previous: dict[str, Any] | None = None  # kept on disk for rollback
    bad_targets: list[str] = field(default_factory=list)  # refused or failed: never tried again
    pending: dict[str, Any] | None = None  # an update between activation and "healthy"
    status_sequence: int = 0  # of the last status report sent; the server ignores older ones
    floors: dict[str, int] = field(default_factory=dict)  # model name -> highest sequence installed
    rollbacks_done: list[str] = field(
        default_factory=list
    )  # command ids carried out (an order can arrive twice)


class StateStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        for sub in ("models", "downloads", "metadata"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)

    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    def load(self) -> AgentState:
        if not self.state_path.exists():
            return AgentState()
        data = json.loads(self.state_path.read_text())
        return AgentState(**{k: v for k, v in data.items() if k in AgentState.__dataclass_fields__})

    def save(self, state: AgentState) -> None:
        write_atomic(self.state_path, json.dumps(asdict(state), indent=1, sort_keys=True).encode())

    def load_credentials(self) -> dict[str, str] | None:
        path = self.folder / "credentials.json"
        return json.loads(path.read_text()) if path.exists() else None

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
