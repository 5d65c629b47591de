"""The agent as a service manager sees it, on real processes: how it stops, what it logs, which exit code.

Attacks and accidents from outside the process: a revoked device, a server that is down, a second agent on the
same state dir, a signal while enrollment retries, a trust root that is not there.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from edgefleet.agent.exits import EXIT_CONFIG_CANNOT_WORK, EXIT_REVOKED, EXIT_STOPPED
from edgefleet.devtools.localfleet import LocalFleet, wait_for

V1 = "digits/1/float32.tflite"


def _exit_code(process: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"the agent was still running after {timeout:.0f} s") from None


def _free_port(pair: bool = False) -> int:
    """A port free now (and, with `pair`, the one after it too: tests run beside others, see scripts/test)."""
    while True:
        with socket.socket() as s, socket.socket() as after:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            if not pair:
                return port
            try:
                after.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def test_revoked_agent_exits_77_with_one_line_and_no_traceback(fleet: LocalFleet, digits_files: dict) -> None:
    agent = fleet.start_agent("cam", fleet.enrollment_token())
    fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
    fleet.cli("deploy", "digits", "1", "--to", "all")
    fleet.wait_running(agent, V1)
    fleet.cli("revoke", agent.device_id())
    assert _exit_code(agent.process, 60) == EXIT_REVOKED
    log = agent.log()
    assert "Traceback" not in log, log[-3000:]
    assert log.count("refused this device as revoked") == 1, log[-3000:]


def test_reconnects_while_the_server_is_down_log_one_line_each_and_no_traceback(
    fleet: LocalFleet,
) -> None:
    agent = fleet.start_agent("cam", fleet.enrollment_token())
    wait_for(lambda: "connected to" in agent.log(), 30, "the agent to connect")
    fleet.stop_server()
    wait_for(lambda: agent.log().count("retrying in") >= 3, 60, "three reconnect attempts")
    fleet.start_server()
    wait_for(lambda: agent.log().count("connected to") >= 2, 60, "the agent to reconnect")
    log = agent.log()
    assert "Traceback" not in log, log[-3000:]
    assert log.count("lost") == 1, log[-3000:]  # one line for the change of state, not one per attempt
    assert all(fleet.address in line for line in log.splitlines() if "retrying in" in line), log[-3000:]
    agent.process.send_signal(signal.SIGTERM)
    assert _exit_code(agent.process, 20) == EXIT_STOPPED


def test_second_agent_on_the_same_state_dir_exits_78_naming_the_first(fleet: LocalFleet) -> None:
    first = fleet.start_agent("cam", fleet.enrollment_token())
    second = fleet.start_agent("cam", "", wait=False)
    assert _exit_code(second.process, 30) == EXIT_CONFIG_CANNOT_WORK
    assert f"pid {first.process.pid}" in second.log(), second.log()[-2000:]
    assert "Traceback" not in second.log()
    assert first.process.poll() is None
    first.stop()  # the fleet knows only the second under this name


def test_sigterm_stops_an_agent_whose_enrollment_keeps_retrying(tmp_path: Path, fleet: LocalFleet) -> None:
    nowhere = f"127.0.0.1:{_free_port(pair=True)}"
    state = tmp_path / "lonely"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "edgefleet.agent", "--server", nowhere, "--state-dir", str(state),
            "--trust-root", str(fleet.keys / "root.json"), "--ca-cert", str(fleet.data_dir / "ca" / "ca.crt"),
            "--enroll-token", "tok", "--local-socket", "-",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    enroll_at = f"127.0.0.1:{int(nowhere.rsplit(':', 1)[1]) + 1}"  # derived from --server: its port + 1
    time.sleep(4)
    process.send_signal(signal.SIGTERM)
    code = _exit_code(process, 10)
    out = process.communicate()[0].decode()
    assert code == EXIT_STOPPED, out
    assert enroll_at in out and "retrying in" in out, out
    assert all(enroll_at in line for line in out.splitlines() if "retrying in" in line), out
    assert "Traceback" not in out, out


def test_enrollment_address_follows_the_server_port_by_default(fleet: LocalFleet) -> None:
    # The fleet's server listens on a free port P with enrollment on P+1 when not told otherwise.
    fleet.stop_server()
    base = _free_port(pair=True)
    fleet.port, fleet.enroll_port = base, base + 1
    fleet.start_server()
    assert fleet.enroll_port == base + 1
    process = subprocess.Popen(
        [
            sys.executable, "-m", "edgefleet.agent", "--server", fleet.address,
            "--state-dir", str(fleet.root / "agents" / "derived"), "--name", "derived",
            "--trust-root", str(fleet.keys / "root.json"), "--ca-cert", str(fleet.data_dir / "ca" / "ca.crt"),
            "--enroll-token", fleet.enrollment_token(), "--local-socket", "-",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(lambda: any(d["name"] == "derived" for d in fleet.devices()), 30, "the agent to enroll")
    finally:
        process.send_signal(signal.SIGTERM)
        _exit_code(process, 15)
        process.communicate()


def test_missing_trust_root_is_one_line_and_exit_78(tmp_path: Path, fleet: LocalFleet) -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "edgefleet.agent", "--server", fleet.address, "--state-dir",
            str(tmp_path / "a"), "--trust-root", str(tmp_path / "nope.json"), "--enroll-token", "t",
            "--local-socket", "-",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == EXIT_CONFIG_CANNOT_WORK, done.stderr
    assert "nope.json" in done.stderr and "Traceback" not in done.stderr, done.stderr
