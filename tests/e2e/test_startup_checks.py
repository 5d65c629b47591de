"""What the server and the agent check when they start, and how they log: a partial install or a missing
runtime is one line saying what to do (not a traceback at the first push), and `--log-format json` is one
JSON object per line. Real processes, started as an operator would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from edgefleet.agent.exits import EXIT_CONFIG_CANNOT_WORK
from edgefleet.devtools.localfleet import LocalFleet, wait_for


def _json_lines(text: str) -> list[dict]:
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
        assert line["time"].endswith("Z"), line
    return lines


def test_a_server_without_its_quantizer_refuses_to_start_and_says_how_to_fix_it(tmp_path: Path) -> None:
    fleet = LocalFleet(tmp_path / "fleet")
    fleet.init_keys()
    hide = tmp_path / "hide"
    hide.mkdir()
    # As if ai-edge-quantizer were not installed: Python treats a None entry in sys.modules as "not there".
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['ai_edge_quantizer'] = None\n")
    done = subprocess.run(
        [
            sys.executable, "-m", "edgefleet.cli", "server", "--data-dir", str(tmp_path / "data"),
            "--listen", "127.0.0.1:0", "--trust-root", str(fleet.keys / "root.json"),
            "--online-key", str(fleet.keys / "online.key"),
        ],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert 'pip install "edgefleet[server]"' in done.stderr and "ai-edge-quantizer" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_an_agent_asked_for_a_runtime_that_is_not_installed_exits_78(
    tmp_path: Path, fleet: LocalFleet
) -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "edgefleet.agent", "--server", fleet.address, "--state-dir",
            str(tmp_path / "a"), "--runtime", "no-such-runtime", "--local-socket", "-",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == EXIT_CONFIG_CANNOT_WORK, done.stderr
    assert "no-such-runtime" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_agent_and_server_log_one_json_object_per_line(tmp_path: Path) -> None:
    fleet = LocalFleet(tmp_path / "fleet")
    fleet.init_keys()
    fleet.start_server("--log-format", "json")
    try:
        agent = fleet.start_agent("cam", fleet.enrollment_token(), "--log-format", "json")
        wait_for(lambda: "connected to" in agent.log(), 30, "the agent to connect")
        agent.process.send_signal(signal.SIGTERM)
        agent.process.wait(timeout=20)
        logged = _json_lines(agent.log())
        assert any(line["message"].startswith("connected to") for line in logged)
        assert all(line["logger"].startswith("edgefleet") for line in logged)  # no library chatter at INFO
    finally:
        fleet.close()
    served = _json_lines(fleet.server_log())
    assert any("edgefleet server on" in line["message"] for line in served)
