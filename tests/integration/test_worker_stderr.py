"""A model worker's stderr goes into the agent's log: the runtimes' routine lines (XNNPACK's "Created
delegate") at DEBUG, so they are silent unless -v, and a real crash message at WARNING, never lost."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent import worker_stderr
from edgefleet.agent.serving import ModelWorker
from edgefleet.errors import ModelError
from edgefleet.runtime import default_runtime


def _wait_for_reader(worker: ModelWorker) -> None:
    """The reader ends when the worker's stderr closes (it exited): then every line has been logged."""
    worker.kill()
    for thread in threading.enumerate():
        if thread.name == f"worker-{worker.pid}-stderr":
            thread.join(10)


def test_the_xnnpack_delegate_line_is_logged_at_debug_labelled_with_the_worker(
    digits_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=worker_stderr.log.name)
    worker = ModelWorker(digits_files["v1"], default_runtime())
    worker.start()
    _wait_for_reader(worker)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == worker_stderr.log.name]
    assert (
        logging.DEBUG,
        f"model worker {worker.pid}: INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    ) in lines
    assert all(level == logging.DEBUG for level, _ in lines), lines


def test_a_worker_that_aborts_while_serving_leaves_its_crash_message_in_the_log_as_a_warning(
    digits_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """SIGABRT is what a C++ runtime's failed check raises; sent from outside, as the kernel would."""
    caplog.set_level(logging.DEBUG, logger=worker_stderr.log.name)
    worker = ModelWorker(digits_files["v1"], default_runtime())
    worker.start()
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGABRT)
    with pytest.raises(ModelError, match="worker died"):
        worker.call([np.zeros((1, 64), np.float32)], timeout=10)
    _wait_for_reader(worker)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"model worker {worker.pid}: Fatal Python error: Aborted" in warnings, warnings
    assert any("edgefleet/agent/worker.py" in line or "in main" in line for line in warnings), warnings


@pytest.mark.parametrize(
    ("line", "level"),
    [
        ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.", logging.DEBUG),
        ("VERBOSE: Replacing 3 out of 3 node(s) with delegate", logging.DEBUG),
        ("I1201 12:00:00.000000 1234 litert.cc:10] environment created", logging.DEBUG),
        ("ERROR: tensorflow/lite/kernels/add.cc:123 failed", logging.WARNING),
        ("WARNING: Attempting to use a delegate that only supports static-sized tensors", logging.WARNING),
        ("Traceback (most recent call last):", logging.WARNING),
        ("MemoryError", logging.WARNING),
    ],
)
def test_only_the_runtimes_routine_lines_are_demoted(line: str, level: int) -> None:
    assert worker_stderr.level_of(line) == level
