"""A model worker's stderr, read into the agent's log.

The worker's fd 2 is a pipe (edgefleet.agent.serving): what the C++ runtime and Python write there never
reaches the agent's own stderr unlabelled. Neither runtime has a log level to set for it: TFLite's minimal
logger ignores TF_CPP_MIN_LOG_LEVEL, and disabling its default delegates would drop XNNPACK itself. So each
line is judged here: the runtimes' routine lines ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.")
are DEBUG (shown with -v); anything else (a runtime WARNING or ERROR, a Python traceback, faulthandler's
"Fatal Python error: Segmentation fault") is a WARNING, so a real crash message is kept.
"""

from __future__ import annotations

import logging
import threading
from typing import IO

from edgefleet.runtime import routine_runtime_line

log = logging.getLogger("edgefleet.agent.worker")
_LONGEST_LINE = 4096  # bytes; a longer one is logged in pieces rather than held in memory whole


def follow(stream: IO[bytes], pid: int) -> threading.Thread:
    """Logs every line of `stream` until the worker closes it (it exits); returns the (daemon) reader."""
    reader = threading.Thread(target=_pump, args=(stream, pid), name=f"worker-{pid}-stderr", daemon=True)
    reader.start()
    return reader


def level_of(line: str) -> int:
    return logging.DEBUG if routine_runtime_line(line) else logging.WARNING


def _pump(stream: IO[bytes], pid: int) -> None:
    with stream:
        while raw := stream.readline(_LONGEST_LINE):
            line = raw.decode(errors="replace").rstrip()
            if line:
                log.log(level_of(line), "model worker %d: %s", pid, line)
