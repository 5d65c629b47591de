"""The agent's state file keeps its shape: a device's state.json from before typed values still loads, and
what the agent writes now has the same keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefleet import errors
from edgefleet.agent.state import AgentState, Pending, StateStore
from edgefleet.values import ModelRef

REF_V2 = {
    "target_path": "digits/2/float32.tflite",
    "model_name": "digits",
    "version": "2",
    "variant": "float32",
    "sha256": "ab" * 32,
    "length": 1234,
}
REF_V1 = {**REF_V2, "target_path": "digits/1/float32.tflite", "version": "1", "sha256": "cd" * 32}
# As agents wrote it before the state held typed values (json.dumps(asdict(state), indent=1, sort_keys=True)).
OLD_STATE = {
    "bad_targets": ["digits/3/int8.tflite"],
    "current": REF_V2,
    "floors": {"digits": 2},
    "pending": {"activated_ms": 1764582000000, "starts": 2, "target_path": "digits/2/float32.tflite"},
    "previous": REF_V1,
    "rollbacks_done": ["cmd-1"],
    "status_sequence": 17,
}


def _store_with(tmp_path: Path, data: dict) -> StateStore:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "state.json").write_text(json.dumps(data, indent=1, sort_keys=True))
    return StateStore(tmp_path)


def test_state_file_written_before_typed_values_loads(tmp_path: Path) -> None:
    state = _store_with(tmp_path, OLD_STATE).state
    assert state.current == ModelRef(**REF_V2)
    assert state.previous == ModelRef(**REF_V1)
    assert state.pending == Pending("digits/2/float32.tflite", 1764582000000, starts=2)
    assert state.bad_targets == ["digits/3/int8.tflite"]
    assert (state.floors, state.rollbacks_done, state.status_sequence) == ({"digits": 2}, ["cmd-1"], 17)


def test_state_file_round_trips_byte_for_byte(tmp_path: Path) -> None:
    store = _store_with(tmp_path, OLD_STATE)
    before = (tmp_path / "state.json").read_text()
    store.save()
    assert (tmp_path / "state.json").read_text() == before


def test_pending_update_not_yet_restarted_is_written_without_a_start_count(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.commit(AgentState(current=ModelRef(**REF_V2), pending=Pending(REF_V2["target_path"], 5)))
    written = json.loads((tmp_path / "state.json").read_text())
    assert set(written) == set(OLD_STATE)
    assert written["pending"] == {"target_path": REF_V2["target_path"], "activated_ms": 5}
    assert written["current"] == REF_V2 and written["previous"] is None


def test_empty_state_folder_starts_with_nothing(tmp_path: Path) -> None:
    state = StateStore(tmp_path).state
    assert state.current is None and state.previous is None and state.pending is None


def test_unknown_keys_from_a_newer_agent_are_ignored(tmp_path: Path) -> None:
    state = _store_with(tmp_path, {**OLD_STATE, "from_the_future": 1}).state
    assert state.current == ModelRef(**REF_V2)


def test_state_file_with_a_malformed_model_reference_is_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidRequestError):
        _ = _store_with(tmp_path, {**OLD_STATE, "current": {"target_path": ""}}).state
