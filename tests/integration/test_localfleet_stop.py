"""LocalFleet.stop_server must not leave a server behind that ignores SIGTERM (as AgentProcess.stop does)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from edgefleet.devtools.localfleet import LocalFleet

# A stand-in for a server stuck in shutdown: it ignores SIGTERM and says so once it does.
STUCK = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"


def test_stop_server_kills_a_server_that_ignores_sigterm(tmp_path: Path) -> None:
    fleet = LocalFleet(tmp_path)
    process = subprocess.Popen([sys.executable, "-c", STUCK], stdout=subprocess.PIPE)
    fleet.server = process
    try:
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        fleet.stop_server(timeout=0.5)
        assert process.returncode == -signal.SIGKILL
        assert fleet.server is None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
