"""The TFLite interpreters edgefleet runs on: ai-edge-litert (maintained) and tflite-runtime (2.14, the last
release, still common on devices). Both expose the same `Interpreter` API; this module picks one by name so
the rest of the code never imports either directly.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
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
