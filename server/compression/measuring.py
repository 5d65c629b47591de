"""Running every variant on every runtime, never in the server's process (`edgefleet.server.compression`
says what is measured and how)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.runtime import available_runtimes, make_interpreter

MEASURE_TIMEOUT_S = 3600


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def batches(x: np.ndarray, batch: int) -> list[np.ndarray]:
    """Rows of x in chunks of the model's batch size; the last one zero-padded."""
    chunks = []
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        chunks.append(np.pad(chunk, [(0, batch - len(chunk))] + [(0, 0)] * (x.ndim - 1)))
    return chunks


@dataclass(frozen=True, eq=False)
class Measured:
    """One variant on one runtime: its outputs on the eval inputs (by output name, dequantized to the values
    they stand for, float64), or why there are none."""

    error: str = ""
    outputs: dict[str, np.ndarray] | None = None
    latency_ms: float = 0.0
    peak_memory_bytes: int = 0
    model_memory_bytes: int = 0  # peak_memory_bytes less the runtime's fixed cost (see `measure`)


def measure(
    models: dict[str, bytes], inputs: dict[str, np.ndarray], runtimes: tuple[str, ...]
) -> dict[str, dict[str, Measured]]:
    """Run every model on every runtime over the eval inputs (rows by input name), one child process per
    runtime (see `measure_in_child`). A variant's tensors are matched to the names by name, or by position
    when its names differ.

    Models never run in this process: some variants crash a runtime (blockwise int4 segfaults
    tflite-runtime 2.14), and that must cost one variant, not the server.
    """
    with tempfile.TemporaryDirectory(prefix="edgefleet-variants-") as tmp:
        work = Path(tmp)
        np.savez(work / "inputs.npz", *inputs.values(), names=np.array(list(inputs), dtype=str))
        for name, model in models.items():
            (work / f"{name}.tflite").write_bytes(model)
        (work / f"{BASELINE}.tflite").write_bytes(_baseline_model())
        # One BLAS thread: the child forks, and a fork copies only the calling thread.
        env = os.environ | {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        children = {}
        for runtime in runtimes:
            (work / runtime).mkdir()
            command = [sys.executable, "-c", _CHILD_COMMAND, runtime, tmp, BASELINE, *models]
            children[runtime] = subprocess.Popen(
                command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        problems = {}
        for runtime, child in children.items():
            try:
                problems[runtime] = child.communicate(timeout=MEASURE_TIMEOUT_S)[1].decode(errors="replace")
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                problems[runtime] = f"timed out after {MEASURE_TIMEOUT_S} s"
        results = {
            name: {runtime: _load_result(work / runtime, name, problems[runtime]) for runtime in runtimes}
            for name in [BASELINE, *models]
        }
        # What a model needs beyond the runtime's own fixed cost (code pages, thread pools), which varies
        # with the machine's state from run to run: the same measurement of a one-weight model, subtracted.
        baseline = results.pop(BASELINE)
        fixed = {runtime: 0 if run.error else run.peak_memory_bytes for runtime, run in baseline.items()}
        return {
            name: {
                runtime: dataclasses.replace(
                    run, model_memory_bytes=max(0, run.peak_memory_bytes - fixed[runtime])
                )
                for runtime, run in runs.items()
            }
            for name, runs in results.items()
        }


def _load_result(directory: Path, name: str, problem: str) -> Measured:
    result, error = directory / f"{name}.npz", directory / f"{name}.error"
    if result.exists():
        with np.load(result, allow_pickle=False) as saved:
            names = [str(n) for n in saved["names"]]
            outputs = {name: saved[f"arr_{i}"] for i, name in enumerate(names)}
            return Measured("", outputs, float(saved["latency_ms"]), int(saved["peak_memory_bytes"]))
    if error.exists():
        return Measured(error.read_text())
    return Measured(f"not measured: {problem.strip()[-300:] or 'the measuring process stopped'}")


_CHILD_COMMAND = "from edgefleet.server.compression.measuring import measure_in_child; measure_in_child()"
BASELINE = "__runtime_baseline__"


def _baseline_model() -> bytes:
    """One 1x1 fully connected layer: loading it costs what any model costs, and nothing more."""
    from edgefleet.server.tflite_writer import mlp_to_tflite

    return mlp_to_tflite([(np.ones((1, 1), np.float32), np.zeros(1, np.float32))])


def measure_in_child() -> None:
    """Measuring process (argv: runtime, work directory, variant names); writes <runtime>/<name>.npz.

    It imports the runtime once, then forks one process per variant, so each variant starts where no
    interpreter ever existed (its memory is its own), and one that crashes the runtime only loses itself.
    """
    runtime, work, names = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    with np.load(work / "inputs.npz", allow_pickle=False) as saved:
        x = {str(n): saved[f"arr_{i}"] for i, n in enumerate(saved["names"])}
    available_runtimes()  # import the runtimes before any memory baseline
    for name in names:
        result, error = work / runtime / f"{name}.npz", work / runtime / f"{name}.error"
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                outputs, latency_ms, peak = _run(
                    runtime, work / f"{name}.tflite", None if name == BASELINE else x
                )
                np.savez(
                    result,
                    *outputs.values(),
                    names=np.array(list(outputs), dtype=str),
                    latency_ms=latency_ms,
                    peak_memory_bytes=peak,
                )
            except Exception as e:  # the runtime's own errors come as ValueError, RuntimeError, ...
                error.write_text(f"does not load or run: {first_line(e)}")
            finally:
                os._exit(0)
        status = os.waitpid(pid, 0)[1]
        if status and not error.exists():
            how = (
                f"signal {os.WTERMSIG(status)}"
                if os.WIFSIGNALED(status)
                else f"exit {os.WEXITSTATUS(status)}"
            )
            error.write_text(f"crashes the runtime ({how})")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _run(
    runtime: str, model_path: Path, x: dict[str, np.ndarray] | None
) -> tuple[dict[str, np.ndarray], float, int]:
    """Outputs (by name, dequantized) for every row of x, the median ms per invoke after the first, and the
    peak memory growth of loading, allocating and the first invoke (see the module docstring). x None: one
    invoke on zeros (the baseline)."""
    before = _status("VmRSS")
    with contextlib.suppress(OSError):  # without the reset VmHWM keeps the imports' peak: an upper bound
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from the current RSS
    interpreter = make_interpreter(runtime, model_path=str(model_path))
    input_details, output_details = interpreter.get_input_details(), interpreter.get_output_details()
    if x is None:
        x = {d["name"]: np.zeros((1, *d["shape"][1:]), d["dtype"]) for d in input_details}
    rows = _by_detail(input_details, x)
    n = len(next(iter(rows.values())))
    batch = int(input_details[0]["shape"][0]) if len(input_details[0]["shape"]) else 1
    chunks = {index: batches(array, batch) for index, array in rows.items()}
    outputs: list[list[np.ndarray]] = [[] for _ in output_details]
    seconds, peak = [], 0
    for step in range(len(next(iter(chunks.values())))):
        for detail in input_details:
            chunk = chunks[detail["index"]][step]
            interpreter.set_tensor(detail["index"], chunk.reshape(detail["shape"]).astype(detail["dtype"]))
        start = time.perf_counter()
        interpreter.invoke()
        seconds.append(time.perf_counter() - start)
        peak = peak or _status("VmHWM") - before  # before the outputs kept here add to it
        for kept, detail in zip(outputs, output_details, strict=True):
            kept.append(_dequantized(interpreter.get_tensor(detail["index"]), detail))
    result = {
        detail["name"]: np.concatenate(kept)[:n] for kept, detail in zip(outputs, output_details, strict=True)
    }
    return result, 1000 * float(np.median(seconds[1:] or seconds)), peak


def _by_detail(details: list[dict], x: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    """Eval rows per input tensor index: by name, or by position when the names differ (a variant)."""
    if {d["name"] for d in details} == set(x):
        return {d["index"]: x[d["name"]] for d in details}
    if len(details) != len(x):
        raise ValueError(f"the model has {len(details)} inputs, the eval set {len(x)}")
    return {d["index"]: array for d, array in zip(details, x.values(), strict=True)}


def _dequantized(values: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    if scale:
        return scale * (values.astype(np.float64) - zero_point)
    return values.astype(np.float64)
