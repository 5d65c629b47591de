"""What the TFLite runtimes print on a real agent's stderr: their routine lines (XNNPACK's "Created
delegate") stay out of the agent's log unless -v, and then come labelled with the worker they came from;
and off the operator's terminal when the CLI runs a model itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgefleet.devtools.localfleet import LocalFleet

V1 = "digits/1/float32.tflite"
XNNPACK = "Created TensorFlow Lite XNNPACK delegate for CPU."


def test_the_runtimes_xnnpack_lines_reach_the_agents_log_only_when_verbose(
    fleet: LocalFleet, digits_files: dict[str, Path]
) -> None:
    quiet = fleet.start_agent("quiet", fleet.enrollment_token())
    verbose = fleet.start_agent("verbose", fleet.enrollment_token(), "-v")
    # The operator's CLI runs the model too (its golden check): not a word of the runtime on its terminal.
    push = subprocess.run(
        [
            sys.executable, "-m", "edgefleet.cli", "--server", fleet.address,
            "--tls-dir", str(fleet.data_dir / "operator"), "model", "push", str(digits_files["v1"]),
            "--name", "digits", "--version", "1", "--targets-key", str(fleet.keys / "targets.key"),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert push.returncode == 0, push.stderr
    assert push.stderr == "", push.stderr
    fleet.cli("deploy", "digits", "1", "--to", "all")
    fleet.wait_running(quiet, V1)
    fleet.wait_running(verbose, V1)

    assert "activated " + V1 in quiet.log()
    assert XNNPACK not in quiet.log(), quiet.log()
    # Every line is the agent's own: a timestamped record, nothing a library wrote to the terminal itself.
    assert all(line[:4].isdigit() for line in quiet.log().splitlines() if line), quiet.log()

    worker_lines = [line for line in verbose.log().splitlines() if XNNPACK in line]
    assert worker_lines, verbose.log()
    assert all(" edgefleet.agent.worker DEBUG model worker " in line for line in worker_lines), worker_lines
