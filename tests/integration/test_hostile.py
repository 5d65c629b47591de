"""Hostile models against the worker sandbox: a hang, a crash and a memory hog must cost the agent one
worker process, never the agent itself.

Whether an attack applies is a property of the runtime, so each test first checks that (in a throwaway child
process, or from the worker's own outcome) and skips with the reason when the runtime is immune.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from edgefleet.agent.serving import ModelWorker
from edgefleet.devtools import hostile
from edgefleet.errors import ModelError

# Measured on Linux x86_64 (Python 3.11): a worker loading the digits model needs RLIMIT_AS >= 149 MiB with
# ai-edge-litert 2.3.0 and >= 133 MiB with tflite-runtime 2.14.0 (below that the runtime does not even
# import).  512 MiB leaves room for other machines; the memory hog asks for four times as much.
MEMORY_LIMIT = 512 * 2**20
HANG_TIMEOUT = 3.0
LOAD_TIMEOUT = 30.0
# How long a probe waits for an interpreter that should crash; the crashing model takes ~0.3 s.
PROBE_TIMEOUT = 30.0

_INTERPRETER_MODULES = {
    "ai-edge-litert": "ai_edge_litert.interpreter",
    "tflite-runtime": "tflite_runtime.interpreter",
}

# Runs a model through every stage in a fresh interpreter, announcing each stage before it starts.
_PROBE = """
import importlib, sys
import numpy as np
print("load", flush=True)
interpreter = importlib.import_module(sys.argv[2]).Interpreter(model_path=sys.argv[1], num_threads=1)
print("allocate_tensors", flush=True)
interpreter.allocate_tensors()
print("invoke", flush=True)
for detail in interpreter.get_input_details():
    interpreter.set_tensor(detail["index"], np.ones(detail["shape"], detail["dtype"]))
interpreter.invoke()
print("done", flush=True)
"""


def _probe(model_path: Path, runtime: str, timeout: float) -> str:
    """What the runtime does with the model, e.g. 'SIGSEGV in allocate_tensors', 'hangs in invoke', 'runs'."""
    command = [sys.executable, "-c", _PROBE, str(model_path), _INTERPRETER_MODULES[runtime]]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        return f"hangs in {(out.split() or ['startup'])[-1]}"
    stage = (done.stdout.split() or ["startup"])[-1]
    if done.returncode < 0:
        return f"{signal.Signals(-done.returncode).name} in {stage}"
    if done.returncode:
        return f"{stage} fails: {(done.stderr.strip().splitlines() or ['?'])[-1][:300]}"
    return "runs"


@pytest.fixture(scope="module")
def digits_model(digits_files: dict[str, Path]) -> Path:
    """digits v1 (seed 0): the session's model (tests/conftest.py), not trained again here."""
    return digits_files["v1"]


def _write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _children() -> set[int]:
    return {child.pid for child in psutil.Process().children()}


def _one_input() -> list[np.ndarray]:
    return [np.ones(hostile.SHAPE, np.float32)]


def test_hanging_model_is_stopped_after_the_timeout(runtime: str, tmp_path: Path) -> None:
    path = _write(tmp_path, "hang.tflite", hostile.build_hanging_model())
    before = _children()
    worker = ModelWorker(path, runtime)
    try:
        signature = worker.start(LOAD_TIMEOUT)  # the attack is in invoke(): loading is quick and fine
        assert [(t.name, t.dtype, t.shape) for t in signature.inputs] == [("x", "float32", (1, 4))]
        (pid,) = _children() - before
        started = time.monotonic()
        try:
            outputs = worker.call(_one_input(), HANG_TIMEOUT)
        except ModelError as e:
            elapsed = time.monotonic() - started
            assert "did not finish within 3 s" in str(e)
        else:
            pytest.skip(f"invoke() returns on {runtime} ({outputs}): the hang does not apply")
        assert HANG_TIMEOUT <= elapsed < HANG_TIMEOUT + 5
        assert not psutil.pid_exists(pid), "the hung worker was not stopped"
        assert not worker.alive()
    finally:
        worker.kill()


@pytest.mark.parametrize("memory_limit", [0, MEMORY_LIMIT], ids=["no-limit", "memory-limit"])
def test_crashing_model_kills_only_its_worker(runtime: str, memory_limit: int, tmp_path: Path) -> None:
    path = _write(tmp_path, "crash.tflite", hostile.build_crashing_model())
    outcome = _probe(path, runtime, PROBE_TIMEOUT)
    if not outcome.startswith("SIG"):
        pytest.skip(f"the crashing model does not crash {runtime}: {outcome}")

    # Both runtimes die in allocate_tensors, so in start(); one that died in invoke() would die in call().
    stage = "inference" if outcome.endswith(" in invoke") else "load"
    before = _children()
    worker = ModelWorker(path, runtime, memory_limit_bytes=memory_limit)
    try:
        with pytest.raises(ModelError, match=f"model worker died during {stage}"):
            worker.start(LOAD_TIMEOUT)
            worker.call(_one_input(), LOAD_TIMEOUT)
        assert _children() == before, "the dead worker was not reaped"
        assert not worker.alive()
    finally:
        worker.kill()


def test_memory_hog_does_not_load_under_the_memory_limit(
    runtime: str, digits_model: Path, tmp_path: Path
) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("the worker's memory limit is RLIMIT_AS, which only Linux enforces this way")
    # Controls: a real model, and a small hog, load and run under the limit...
    for path, inputs in [
        (digits_model, [np.zeros((1, 64), np.float32)]),
        (_write(tmp_path, "small-hog.tflite", hostile.build_memory_hog_model(16 * 2**20)), _one_input()),
    ]:
        worker = ModelWorker(path, runtime, memory_limit_bytes=MEMORY_LIMIT)
        try:
            worker.start(LOAD_TIMEOUT)
            (output,) = worker.call(inputs, LOAD_TIMEOUT)
            assert np.all(np.isfinite(output))
        finally:
            worker.retire()

    # ...while a hog needing four times the limit, in a file of under 1 KB, does not load.
    hog = hostile.build_memory_hog_model(4 * MEMORY_LIMIT)
    assert len(hog) < 1024
    before = _children()
    worker = ModelWorker(_write(tmp_path, "hog.tflite", hog), runtime, memory_limit_bytes=MEMORY_LIMIT)
    try:
        with pytest.raises(ModelError, match="model does not load: (RuntimeError|MemoryError)"):
            worker.start(LOAD_TIMEOUT)
        assert _children() == before
    finally:
        worker.kill()


def test_memory_hog_size_must_fit_a_tensor() -> None:
    with pytest.raises(ValueError):
        hostile.build_memory_hog_model(0)
    with pytest.raises(ValueError):
        hostile.build_memory_hog_model(2**40)


def test_hostile_models_are_deterministic() -> None:
    assert hostile.build_hanging_model() == hostile.build_hanging_model()
    assert hostile.build_crashing_model() == hostile.build_crashing_model()
    assert hostile.build_memory_hog_model(2**20) == hostile.build_memory_hog_model(2**20)
