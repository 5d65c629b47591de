"""The TFLite interpreters edgefleet runs on: ai-edge-litert (maintained) and tflite-runtime (2.14, the last
release, still common on devices). Both expose the same `Interpreter` API; this module picks one by name so
the rest of the code never imports either directly.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from edgefleet.errors import IncompatibleError

LITERT = "ai-edge-litert"
TFLITE_RUNTIME = "tflite-runtime"
RUNTIMES = (LITERT, TFLITE_RUNTIME)

_MODULES = {LITERT: "ai_edge_litert.interpreter", TFLITE_RUNTIME: "tflite_runtime.interpreter"}


def _module(name: str) -> Any:
    if name not in _MODULES:
        raise IncompatibleError(f"unknown runtime {name!r}: choose one of {', '.join(RUNTIMES)}")
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as e:
        raise IncompatibleError(f"runtime {name} is not installed here ({e}); pip install {name}") from e


def available_runtimes() -> list[str]:
    found = []
    for name in RUNTIMES:
        try:
            _module(name)
        except IncompatibleError:
            continue
        found.append(name)
    return found


def default_runtime() -> str:
    """EDGEFLEET_RUNTIME if set, else the first runtime installed (LiteRT preferred)."""
    chosen = os.environ.get("EDGEFLEET_RUNTIME")
    if chosen:
        _module(chosen)
        return chosen
    found = available_runtimes()
    if not found:
        raise IncompatibleError("no TFLite runtime installed: pip install ai-edge-litert")
    return found[0]


def runtime_version(name: str) -> str:
    return importlib.metadata.version(name)


def make_interpreter(
    runtime: str, *, model_path: str | None = None, model_content: bytes | None = None, num_threads: int = 1
) -> Any:
    """A ready (tensors allocated) interpreter. Raises IncompatibleError, or ValueError/RuntimeError from the
    runtime when the model does not load."""
    module = _module(runtime)
    interpreter = module.Interpreter(
        model_path=model_path, model_content=model_content, num_threads=num_threads
    )
    interpreter.allocate_tensors()
    return interpreter


# ---- what the runtimes print on fd 2 ---------------------------------------------------------------------
# Their C++ code writes to fd 2 directly ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.", once per
# interpreter) and neither has a log level to set for it: TFLite's minimal logger ignores TF_CPP_MIN_LOG_LEVEL.
# TFLite's minimal logger ("INFO: ", "VERBOSE: ") and absl's info lines ("I1201 12:00:00.000 ...").
_ROUTINE = re.compile(r"(INFO|VERBOSE): |I\d{4} ")


def routine_runtime_line(line: str) -> bool:
    """A runtime's routine line, for debug logs only; anything else (WARNING, ERROR, a crash) is not."""
    return _ROUTINE.match(line) is not None


@contextlib.contextmanager
def runtime_chatter_held_back() -> Iterator[None]:
    """For a command-line tool running an interpreter in its own process: fd 2 goes to a temp file meanwhile,
    and its lines are written back to stderr afterwards, all but the routine ones."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for raw in held:
                line = raw.decode(errors="replace").rstrip()
                if line and not routine_runtime_line(line):
                    print(line, file=sys.stderr)
