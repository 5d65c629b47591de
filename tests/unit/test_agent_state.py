"""The agent's state file keeps its shape: a device's state.json from before typed values still loads, and
what the agent writes now has the same keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


def test_retry_lifts_are_kept_and_only_written_once_there_are_some(tmp_path: Path) -> None:
    store = _store_with(tmp_path, OLD_STATE)
    store.save()
    assert "retries" not in json.loads((tmp_path / "state.json").read_text())
    store.state.retries = {"digits/3/int8.tflite": ["ro-ab12-w0-retry1"]}
    store.save()
    assert StateStore(tmp_path).state.retries == {"digits/3/int8.tflite": ["ro-ab12-w0-retry1"]}


DAMAGED = {
    "empty": b"",
    "truncated": json.dumps(OLD_STATE).encode()[:57],
    "garbage": bytes(range(256)),
    "not utf-8": b'{"current": "\xff\xfe"}',
    "a list": b"[1, 2, 3]",
    "a number": b"17",
    "a malformed model reference": json.dumps({**OLD_STATE, "current": {"target_path": ""}}).encode(),
    "a reference of the wrong type": json.dumps({**OLD_STATE, "current": "digits"}).encode(),
    "a string for a list": json.dumps({**OLD_STATE, "bad_targets": "digits/3/int8.tflite"}).encode(),
    "a list for the floors": json.dumps({**OLD_STATE, "floors": [1]}).encode(),
    "a string for a floor": json.dumps({**OLD_STATE, "floors": {"digits": "2"}}).encode(),
    "a bool for the sequence": json.dumps({**OLD_STATE, "status_sequence": True}).encode(),
    "a negative sequence": json.dumps({**OLD_STATE, "status_sequence": -1}).encode(),
    "a malformed pending update": json.dumps({**OLD_STATE, "pending": {"activated_ms": 1}}).encode(),
    "a list for the retries": json.dumps({**OLD_STATE, "retries": ["x"]}).encode(),
    "a string for a target's retries": json.dumps({**OLD_STATE, "retries": {"d/3/i.tflite": "o"}}).encode(),
    "deep nesting": b"[" * 100000 + b"]" * 100000,
}


@pytest.mark.parametrize("damage", sorted(DAMAGED))
def test_damaged_state_file_is_moved_aside_and_the_agent_starts_clean(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "state.json").write_bytes(DAMAGED[damage])
    store = StateStore(tmp_path)
    assert store.state == AgentState() and store.damaged
    assert not (tmp_path / "state.json").exists()
    (aside,) = tmp_path.glob("state.json.damaged-*")
    assert aside.read_bytes() == DAMAGED[damage]
    assert [r.message for r in caplog.records if "state file damaged" in r.message]


@pytest.mark.parametrize("damage", ["empty", "garbage", "a list", "no device id"])
def test_damaged_credentials_are_moved_aside_with_a_line_that_says_enroll_again(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = {"empty": b"", "garbage": b"\x00\xff{", "a list": b"[]", "no device id": b'{"device_token": "t"}'}
    store = StateStore(tmp_path)
    (tmp_path / "credentials.json").write_bytes(data[damage])
    assert store.load_credentials() is None
    assert list(tmp_path.glob("credentials.json.damaged-*"))
    assert any("enroll again" in r.message for r in caplog.records)


def test_intact_credentials_load(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save_credentials({"device_id": "d1", "device_token": "t"})
    assert store.load_credentials() == {"device_id": "d1", "device_token": "t"}
