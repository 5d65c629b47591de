"""Attacks on what the agent runs, from outside its process: bytes that do not hash on the wire or in a
resumed download (class 3 of the trust issue), files rewritten between the check and the load (class 1),
planted files at start (class 2), damaged state files (class 5).

Each test names the attack; "never runs" is checked by asking the agent which model answered.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import psutil
from conftest import v1_running

from edgefleet.devtools.localfleet import AgentProcess, LocalClient, LocalFleet, wait_for
from edgefleet.runtime import default_runtime, make_interpreter

V1 = "digits/1/float32.tflite"
V2 = "digits/2/float32.tflite"
FAULTS = {"EDGEFLEET_ALLOW_TEST_FAULTS": "1"}
ZEROS = np.zeros((1, 64), np.float32)


def _serves(agent: AgentProcess) -> str:
    return _answer(agent)[1]


def _answer(agent: AgentProcess) -> tuple[np.ndarray, str]:
    """(the output on zeros, the target that answered)."""
    client = LocalClient(agent.socket)
    try:
        outputs, target = client.infer([ZEROS])
        return outputs[0], target
    finally:
        client.close()


def _serves_or_nothing(agent: AgentProcess) -> str:
    try:
        return _serves(agent)
    except Exception:  # nothing serves yet
        return ""


def _reference_output(model: Path) -> np.ndarray:
    """What the model's own bytes answer on zeros, outside the agent."""
    interpreter = make_interpreter(default_runtime(), model_path=str(model))
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], ZEROS)
    interpreter.invoke()
    return np.asarray(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))


def _events(fleet: LocalFleet, agent: AgentProcess) -> list[dict]:
    return fleet.cli_json("events", "--device", agent.device_id(), "--limit", "200")


def _stopped(agent: AgentProcess) -> bool:
    try:
        return psutil.Process(agent.process.pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


def _continued(agent: AgentProcess) -> bool:
    """Sends SIGCONT to an agent stopped at its fault step; False (so a wait goes on polling)."""
    if _stopped(agent):
        os.kill(agent.process.pid, signal.SIGCONT)
    return False


def _running_healthy_continuing(fleet: LocalFleet, agent: AgentProcess, target: str) -> bool:
    """Whether `agent` runs `target` healthily; an agent stopped at its fault step is continued."""
    if _stopped(agent):
        os.kill(agent.process.pid, signal.SIGCONT)
        return False
    if agent.process.poll() is not None:
        raise RuntimeError(f"agent exited:\n{agent.log()[-3000:]}")
    device = fleet.device(agent)
    running = device.get("running") or {}
    return running.get("target_path") == target and device["last_stage"] == "healthy"


def _sha_of(fleet: LocalFleet, version: str) -> str:
    return str(next(m["sha256"] for m in fleet.cli_json("model", "list") if m["version"] == version))


# ---- class 3: transport and tampering faults never blacklist ------------------------------------------------


def test_spliced_resume_of_other_bytes_starts_over_from_byte_0_and_is_not_blacklisted(
    fleet: LocalFleet, digits_files: dict
) -> None:
    """A `.part` file of other bytes (a splice, a relay that injected bytes before a cut): the resumed
    download does not hash, is thrown away, fetched again from byte 0 and installed."""
    agent = v1_running(fleet, digits_files)
    agent.stop()
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    sha = _sha_of(fleet, "2")
    (agent.state_dir / "downloads" / f"{sha}.part").write_bytes(os.urandom(300))
    fleet.cli("deploy", "digits", "2", "--to", "all")

    agent = fleet.start_agent("cam")
    fleet.wait_running(agent, V2, timeout=90)
    log = agent.log()
    assert f"downloading {V2} from byte 300" in log
    assert f"downloading {V2} from byte 0" in log.split(f"downloading {V2} from byte 300", 1)[1]
    assert V2 not in agent.state()["bad_targets"]
    assert _serves(agent) == V2


# ---- class 1: the bytes that load are the bytes that were hashed ---------------------------------------------


def test_model_file_rewritten_between_its_check_and_its_load_never_runs(
    fleet: LocalFleet, digits_files: dict
) -> None:
    """The agent stops (SIGSTOP) right after the verified file is in place; another process rewrites it with
    other bytes; the agent continues. What loads is re-read and checked: the rewritten bytes never run, and
    the signed version is fetched again, not marked bad."""
    agent = v1_running(fleet, digits_files)
    agent.stop()
    agent = fleet.start_agent("cam", env={**FAULTS, "EDGEFLEET_TEST_FAULTS": "written:stop"})
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    sha = _sha_of(fleet, "2")
    fleet.cli("deploy", "digits", "2", "--to", "all")
    wait_for(lambda: _stopped(agent), 60, "the agent to stop with v2's file in place")
    (agent.state_dir / "models" / f"{sha}.tflite").write_bytes(digits_files["v1"].read_bytes())
    os.kill(agent.process.pid, signal.SIGCONT)

    wait_for(lambda: _running_healthy_continuing(fleet, agent, V2), 90, "v2 to run healthily")
    output, target = _answer(agent)
    assert target == V2
    np.testing.assert_allclose(output, _reference_output(digits_files["v2"]), rtol=1e-5)
    assert V2 not in agent.state()["bad_targets"]
    assert "not the signed bytes" in agent.log()


def test_model_file_rewritten_in_place_after_its_bytes_were_hashed_does_not_change_what_loads(
    fleet: LocalFleet, digits_files: dict
) -> None:
    """The agent stops after it read and checked the candidate's bytes, before the worker loads them; another
    process rewrites the file in place (same inode). The worker loads the sealed bytes that were checked."""
    agent = v1_running(fleet, digits_files)
    agent.stop()
    agent = fleet.start_agent("cam", env={**FAULTS, "EDGEFLEET_TEST_FAULTS": "sealed:stop"}, wait=False)
    wait_for(lambda: _continued(agent) or (agent.state_dir / "agent.sock").exists(), 60, "the agent to start")
    wait_for(lambda: _running_healthy_continuing(fleet, agent, V1), 60, "v1 to run")
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    sha = _sha_of(fleet, "2")
    fleet.cli("deploy", "digits", "2", "--to", "all")
    wait_for(lambda: _stopped(agent), 60, "the agent to stop with v2's bytes checked")
    model = agent.state_dir / "models" / f"{sha}.tflite"
    inode = model.stat().st_ino
    with open(model, "r+b") as f:  # in place: an open descriptor of the file would see this
        f.write(digits_files["v1"].read_bytes())
        f.truncate()
    assert model.stat().st_ino == inode
    os.kill(agent.process.pid, signal.SIGCONT)

    wait_for(lambda: _running_healthy_continuing(fleet, agent, V2), 90, "v2 to run healthily")
    output, target = _answer(agent)
    assert target == V2
    np.testing.assert_allclose(output, _reference_output(digits_files["v2"]), rtol=1e-5)
    assert V2 not in agent.state()["bad_targets"]


def test_model_file_rewritten_under_a_running_model_never_runs_when_its_worker_restarts(
    fleet: LocalFleet, digits_files: dict
) -> None:
    """Another process rewrites the running model's file, then its worker dies (killed). The restart reads
    and checks the file again: the rewritten bytes never run; the model is fetched again and serves."""
    agent = v1_running(fleet, digits_files)
    sha = agent.state()["current"]["sha256"]
    (agent.state_dir / "models" / f"{sha}.tflite").write_bytes(digits_files["v2"].read_bytes())
    (worker,) = [
        p
        for p in psutil.Process(agent.process.pid).children(recursive=True)
        if "edgefleet.agent.worker" in p.cmdline()
    ]
    worker.kill()

    wait_for(
        lambda: any(
            e["target"] == V1 and e["stage"] == "failed" and "local copy unusable" in e["reason"]
            for e in _events(fleet, agent)
        ),
        60,
        "the rewritten copy to be reported",
    )
    fleet.wait_running(agent, V1, timeout=90)

    def v1_answers() -> bool:
        try:
            output, target = _answer(agent)
        except Exception:  # nothing serves until the copy is back
            return False
        assert target == V1
        np.testing.assert_allclose(output, _reference_output(digits_files["v1"]), rtol=1e-5)
        return True

    wait_for(v1_answers, 60, "v1 to answer again")
    assert V1 not in agent.state()["bad_targets"]


# ---- class 2: local copies are re-verified against the signed metadata at every load ------------------------


def test_planted_model_with_a_planted_description_beside_it_never_runs_at_start(
    fleet: LocalFleet, digits_files: dict
) -> None:
    """Someone who can write the state folder replaces the current model's file with other (validly signed,
    but not this target's) bytes and plants a `.target.json` that describes them. At start the agent checks
    against the signed metadata it holds, refuses the copy, says so, serves the verified previous model and
    fetches the current one again."""
    agent = v1_running(fleet, digits_files)
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    fleet.cli("deploy", "digits", "2", "--to", "all")
    fleet.wait_running(agent, V2)
    agent.stop()
    sha = agent.state()["current"]["sha256"]
    signed = json.loads((agent.state_dir / "metadata" / "targets.json").read_text())["signed"]["targets"]
    models = agent.state_dir / "models"
    (models / f"{sha}.tflite").write_bytes(digits_files["v1"].read_bytes())
    (models / f"{sha}.target.json").write_text(json.dumps({V2: signed[V1]}))

    agent = fleet.start_agent("cam")
    wait_for(
        lambda: any(
            e["target"] == V2 and e["stage"] == "failed" and "local copy unusable" in e["reason"]
            for e in _events(fleet, agent)
        ),
        60,
        "the planted copy to be reported",
    )
    fleet.wait_running(agent, V2, timeout=90)
    output, target = _answer(agent)
    assert target == V2
    np.testing.assert_allclose(output, _reference_output(digits_files["v2"]), rtol=1e-5)
    assert f"local copy of {V2} refused, it will not run" in agent.log()


# ---- class 5: a damaged state file is not a crash loop ---------------------------------------------------


def _log_since(agent: AgentProcess, mark: int) -> str:
    return agent.log_path.read_bytes()[mark:].decode(errors="replace")


def test_damaged_state_file_written_before_start_never_crashes_the_agent_and_it_recovers(
    fleet: LocalFleet, digits_files: dict
) -> None:
    """Empty, garbage, truncated and wrongly shaped state files: moved aside with one log line, no
    traceback; the floors come back from the verified model files, and the model runs again."""
    agent = v1_running(fleet, digits_files)
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    fleet.cli("deploy", "digits", "2", "--to", "all")
    fleet.wait_running(agent, V2)
    floors = agent.state()["floors"]
    intact = (agent.state_dir / "state.json").read_bytes()
    for damage in (b"", os.urandom(300), intact[: len(intact) // 2], b'{"current": 7, "floors": []}'):
        agent.stop()
        (agent.state_dir / "state.json").write_bytes(damage)
        mark = agent.log_path.stat().st_size
        agent = fleet.start_agent("cam")
        wait_for(lambda a=agent: _serves_or_nothing(a) == V2, 90, "v2 to serve again")
        log = _log_since(agent, mark)
        assert "Traceback" not in log
        assert log.count("state file damaged") == 1, log
        assert agent.state()["floors"] == floors
        # Its counter restarted at 0; the server's hello told it where to go on, so nothing was stale.
        assert f"ignored a stale status report from {agent.device_id()}" not in fleet.server_log()
    assert len(list(agent.state_dir.glob("state.json.damaged-*"))) >= 1


def test_damaged_credentials_file_stops_the_agent_with_a_line_that_says_enroll_again(
    fleet: LocalFleet, digits_files: dict
) -> None:
    agent = v1_running(fleet, digits_files)
    agent.stop()
    (agent.state_dir / "credentials.json").write_bytes(b"\x00garbage{")
    mark = agent.log_path.stat().st_size
    agent = fleet.start_agent("cam", wait=False)
    assert agent.process.wait(timeout=60) != 0
    log = _log_since(agent, mark)
    assert "Traceback" not in log
    assert "credentials file damaged" in log and "enroll again" in log
