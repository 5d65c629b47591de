"""What the agent survives, on real processes: kills at every update step, a model that keeps crashing,
a full disk, a corrupted file at rest, a year of clock skew, a stalling link, a busy database.

"Keeps the old model" means: still answering inferences with it, its file intact, a named event reported.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import v1_running

from edgefleet.agent.exits import EXIT_REVOKED
from edgefleet.cli.client import CliError
from edgefleet.devtools.faultproxy import FaultProxy
from edgefleet.devtools.localfleet import AgentProcess, InferenceLoad, LocalClient, LocalFleet, wait_for
from edgefleet.devtools.modelgen import build_large_mlp

V1 = "digits/1/float32.tflite"
V2 = "digits/2/float32.tflite"
FAULTS = {"EDGEFLEET_ALLOW_TEST_FAULTS": "1"}


def _events(fleet: LocalFleet, agent: AgentProcess) -> list[dict]:
    return fleet.cli_json("events", "--device", agent.device_id(), "--limit", "200")


def _wait_event(fleet: LocalFleet, agent: AgentProcess, target: str, stage: str, text: str = "") -> dict:
    def find() -> dict | None:
        return next(
            (
                e
                for e in _events(fleet, agent)
                if e["target"] == target and e["stage"] == stage and text in e["reason"]
            ),
            None,
        )

    return wait_for(find, 60, f"{agent.name}: {stage} {target} {text}")


def _serves(agent: AgentProcess) -> str:
    client = LocalClient(agent.socket)
    try:
        return client.infer([np.zeros((1, 64), np.float32)])[1]
    finally:
        client.close()


def _model_files_verify(agent: AgentProcess, *, leftovers_allowed: bool = False) -> None:
    """Every model file the agent keeps is whole: its name is its sha256. A temp file may survive a kill
    (it is never loaded); a running agent has removed it."""
    for path in (agent.state_dir / "models").glob("*.tflite"):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.stem
    if not leftovers_allowed:
        assert not list((agent.state_dir / "models").glob("*.tmp"))


@pytest.mark.parametrize("step", ["downloaded", "verified", "written", "activated", "committed"])
def test_agent_killed_at_every_update_step_runs_old_or_new_never_half(
    fleet: LocalFleet, digits_files: dict, step: str
) -> None:
    agent = v1_running(fleet, digits_files)
    agent.stop()
    agent = fleet.start_agent("cam", "", env={**FAULTS, "EDGEFLEET_TEST_FAULTS": f"{step}:kill"})
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    fleet.cli("deploy", "digits", "2", "--to", "all")
    wait_for(lambda: agent.process.poll() is not None, 60, f"the agent to be killed at {step}")

    # Right after the kill, the durable state names a whole model: the old one or the new one.
    assert agent.running() in (V1, V2)
    _model_files_verify(agent, leftovers_allowed=True)

    agent = fleet.start_agent("cam")  # no faults this time
    assert _serves(agent) in (V1, V2)
    fleet.wait_running(agent, V2)  # and the update completes, reported by the device itself
    assert _serves(agent) == V2
    _model_files_verify(agent)


def test_agent_killed_while_rolling_back_ends_on_one_model_and_obeys_the_order(
    fleet: LocalFleet, digits_files: dict
) -> None:
    agent = v1_running(fleet, digits_files)
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    fleet.cli("deploy", "digits", "2", "--to", "all")
    fleet.wait_running(agent, V2)
    agent.stop()
    agent = fleet.start_agent("cam", "", env={**FAULTS, "EDGEFLEET_TEST_FAULTS": "rolling_back:kill"})
    fleet.cli("rollback", "--to", "all")
    wait_for(lambda: agent.process.poll() is not None, 30, "the agent to be killed while rolling back")
    assert agent.running() in (V1, V2)
    agent = fleet.start_agent("cam")
    fleet.wait_running(agent, V1)  # the order is still pending on the server and is obeyed
    assert _serves(agent) == V1


def _worker_pids(agent: AgentProcess) -> list[int]:
    """The agent's model worker processes (after a swap has settled: the active model's)."""
    pids = []
    for child in psutil.Process(agent.process.pid).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "edgefleet.agent.worker" in child.cmdline():
                pids.append(child.pid)
        except psutil.Error:
            continue  # exited meanwhile
    return pids


def test_new_model_failing_after_the_swap_goes_back_and_is_marked_bad_without_looping(
    fleet: LocalFleet, digits_files: dict, digits
) -> None:
    agent = v1_running(fleet, digits_files, "--probation", "6", "--check-interval", "2")
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    with InferenceLoad([agent.socket], [digits[2].x_test[:1]]):
        fleet.cli("deploy", "digits", "2", "--to", "all")
        _wait_event(fleet, agent, V2, "activated")
        # v1's worker is retired at the swap; what is left is v2's. It dies under load (as a model that
        # crashes the interpreter would): every call fails.
        for pid in wait_for(
            lambda: len(_worker_pids(agent)) == 1 and _worker_pids(agent), 20, "v2's worker alone"
        ):
            psutil.Process(pid).kill()
        _wait_event(fleet, agent, V1, "rolled_back", "automatic rollback")
    assert agent.running() == V1 and V2 in agent.state()["bad_targets"]
    assert _serves(agent) == V1
    # No loop: v2 is not tried again although the deployment still names it.
    activations = len([e for e in _events(fleet, agent) if e["target"] == V2 and e["stage"] == "activated"])
    with pytest.raises(CliError) as refused:  # a deployment only the bad version would be is refused...
        fleet.cli("deploy", "digits", "2", "--to", "all")
    assert "refused it before" in str(refused.value)
    fleet.cli("deploy", "digits", "2", "--to", "all", "--allow-empty")  # ...and when forced, not looped on
    time.sleep(3)  # longer than the agent's periodic check (2 s here): time enough to loop, if it would
    assert (
        len([e for e in _events(fleet, agent) if e["target"] == V2 and e["stage"] == "activated"])
        == activations
    )


def test_model_file_corrupted_at_rest_is_detected_refetched_and_never_run(
    fleet: LocalFleet, digits_files: dict
) -> None:
    agent = v1_running(fleet, digits_files)
    agent.stop()
    model = agent.state_dir / "models" / (agent.state()["current"]["sha256"] + ".tflite")
    data = bytearray(model.read_bytes())
    data[100] ^= 0x01
    model.write_bytes(bytes(data))

    agent = fleet.start_agent("cam")
    _wait_event(fleet, agent, V1, "failed", "local copy unusable")
    fleet.wait_running(agent, V1)
    _model_files_verify(agent)
    assert _serves(agent) == V1
    stages = [e["stage"] for e in _events(fleet, agent) if e["target"] == V1]
    assert stages[-4:] == ["downloaded", "verified", "activated", "healthy"]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs: a real full disk. Needs root (CI and developer machines here run as root)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_download_removes_the_partial_file_keeps_the_old_model_and_retries(
    fleet: LocalFleet, digits_files: dict, tmp_path: Path, small_disk: Path
) -> None:
    agent = v1_running(fleet, digits_files)
    agent.stop()
    downloads = agent.state_dir / "downloads"
    shutil.rmtree(downloads)
    downloads.symlink_to(small_disk)  # downloads land on the small disk
    agent = fleet.start_agent("cam")
    big = tmp_path / "big.tflite"
    big.write_bytes(build_large_mlp(4 * 2**20, seed=5))
    fleet.cli("model", "push", str(big), "--name", "digits", "--version", "2")
    fleet.cli("deploy", "digits", "2", "--to", "all")

    _wait_event(fleet, agent, "digits/2/float32.tflite", "failed", "No space left")
    wait_for(lambda: not list(small_disk.iterdir()), 10, "the partial file to be removed")
    assert _serves(agent) == V1
    _model_files_verify(agent)
    assert "digits/2/float32.tflite" not in agent.state()["bad_targets"]

    downloads.unlink()  # space again: the retry succeeds
    downloads.mkdir()
    fleet.wait_running(agent, "digits/2/float32.tflite", timeout=90)


LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def _skewed(offset: str) -> dict[str, str]:
    # libfaketime preloaded into the agent itself (the faketime wrapper would not pass on our SIGTERM).
    return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="needs Debian's faketime (scripts/test installs it)")
def test_clock_skew_of_a_year_either_way_is_reported_and_nothing_is_deleted_or_marked(
    fleet: LocalFleet, digits_files: dict
) -> None:
    agent = v1_running(fleet, digits_files)
    agent.stop()

    # A year ahead: the signed metadata looks expired. Refused and reported, v1 keeps serving, v2 not bad.
    agent = fleet.start_agent("cam", env=_skewed("+365d"))
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    fleet.cli("deploy", "digits", "2", "--to", "all")
    _wait_event(fleet, agent, V2, "failed", "expired")
    assert abs(fleet.device(agent)["clock_skew_ms"] / 1000 - 365 * 86400) < 3600
    assert _serves(agent) == V1
    assert V2 not in agent.state()["bad_targets"]
    _model_files_verify(agent)
    agent.stop()

    # A year behind: nothing looks expired; the update goes through and the skew is reported.
    agent = fleet.start_agent("cam", env=_skewed("-365d"))
    fleet.wait_running(agent, V2)
    assert abs(fleet.device(agent)["clock_skew_ms"] / 1000 + 365 * 86400) < 3600


def test_stalled_and_flaky_link_the_watchdog_restarts_the_download_and_inference_is_unaffected(
    fleet: LocalFleet, digits_files: dict, tmp_path: Path, digits
) -> None:
    big = tmp_path / "big.tflite"
    big.write_bytes(build_large_mlp(4 * 2**20, seed=7))
    with FaultProxy(fleet.port, bytes_per_second=1 * 2**20) as proxy:
        agent = fleet.start_agent(
            "cam", fleet.enrollment_token(), "--server", proxy.address, "--stall-timeout", "2"
        )
        fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
        fleet.cli("deploy", "digits", "1", "--to", "all")
        fleet.wait_running(agent, V1)
        fleet.cli("model", "push", str(big), "--name", "digits", "--version", "2")
        with InferenceLoad([agent.socket], [digits[2].x_test[:1]]) as load:
            fleet.cli("deploy", "digits", "2", "--to", "all")
            part = agent.state_dir / "downloads"
            wait_for(
                lambda: any(p.stat().st_size > 2**19 for p in part.glob("*.part")), 30, "download progress"
            )
            proxy.paused = True  # the link stalls: nothing arrives, nothing closes
            wait_for(lambda: "download stalled" in agent.log(), 20, "the stall watchdog")
            proxy.paused = False
            proxy.cut()  # and then breaks outright
            fleet.wait_running(agent, "digits/2/float32.tflite", timeout=90)
        assert load.report.failures == 0, load.report.errors
        assert load.report.calls > 100


def test_database_busy_gives_unavailable_nothing_half_written_and_a_retry_works(
    tmp_path: Path, digits_files: dict
) -> None:
    fleet = LocalFleet(tmp_path / "fleet")
    fleet.init_keys()
    db = fleet.data_dir / "fleet.db"
    fleet.start_server("--database-url", f"sqlite:///{db}?timeout=1")
    try:
        before = fleet.cli_json("model", "list")
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")  # another writer holds the database
        with pytest.raises(CliError, match="unavailable"):
            fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
        lock.execute("ROLLBACK")
        lock.close()
        assert fleet.cli_json("model", "list") == before  # nothing half-written
        fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")  # the retry
        assert [m["version"] for m in fleet.cli_json("model", "list")] == ["1"]
    finally:
        fleet.close()


def test_device_with_revoked_credentials_is_cut_off(fleet: LocalFleet, digits_files: dict) -> None:
    agent = v1_running(fleet, digits_files)
    fleet.cli("revoke", agent.device_id())
    wait_for(lambda: not fleet.device(agent)["connected"], 20, "the revoked device to be disconnected")
    # A revoked device stops (exit 77, which its service manager does not restart): it has no fleet to serve.
    wait_for(lambda: agent.process.poll() is not None, 30, "the revoked agent to stop")
    assert agent.process.returncode == EXIT_REVOKED
    assert "refused this device as revoked" in agent.log()


def test_model_worker_killed_after_probation_is_restarted_and_serving_resumes(
    fleet: LocalFleet, digits_files: dict
) -> None:
    agent = v1_running(fleet, digits_files)
    (pid,) = wait_for(lambda: len(_worker_pids(agent)) == 1 and _worker_pids(agent), 20, "v1's worker")
    psutil.Process(pid).kill()  # the system takes it (out of memory, say)
    wait_for(lambda: _worker_pids(agent) and _worker_pids(agent) != [pid], 20, "a new worker")
    wait_for(lambda: _answers_with(agent, V1), 20, "inference to resume")
    assert agent.running() == V1 and V1 not in agent.state()["bad_targets"]


def _answers_with(agent: AgentProcess, target: str) -> bool:
    try:
        return _serves(agent) == target
    except Exception:  # the call in flight when the worker died fails; the next ones must not
        return False
