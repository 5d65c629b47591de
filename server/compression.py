"""Server-side model compression: build the variants of a pushed float model and measure each one.

`build_variants` quantizes the model with ai-edge-quantizer (float16, dynamic-range int8 per channel and
per tensor, weight-only int8 and int4, dynamic int4, static int8 when calibration data is given) and
magnitude-prunes it before quantizing (``pruned<percent>-<recipe>``). Every variant is run on every
runtime over the eval inputs and the figures go into ``Variant.details`` (read by `server.variants`).

How a variant is judged ("points lost", always against the float32 model on the reference runtime):
with labels, float32's accuracy minus the variant's, in percentage points; without labels, the mean absolute
difference of its outputs from float32's as a percentage of mean ``|float32 output|``. Without an eval set
the inputs are generated (seeded N(0, 1) floats, or uniform integers for integer inputs).

**Correct on a runtime.** Runtimes differ: tflite-runtime 2.14 runs per-channel dynamic int8 without any
error but computes garbage (~10 % on digits), so correctness is measured, never inferred from op versions.
The reference runtime is ai-edge-litert (the first of `runtimes` when it is absent). Runtime R computes
variant V correctly when all of these hold:

1. R loads V, allocates its tensors and runs it on every eval input, with finite outputs;
2. V loses at most ``tolerance_points`` on R: a device never gets what is over tolerance on its runtime;
3. ``mean |out_R - out_ref| <= 2 * mean |out_ref - out_float32| + atol`` on the eval inputs: R may
   disagree with the reference by rounding, but by no more than twice the variant's own error against
   float32 (atol, 1e-4 of the mean |float32 output|, absorbs float rounding for float variants).
   Measured on digits: correct runtimes disagree by 0.01-0.5x the own error, the wrong kernel by ~300x.

A variant is ``excluded`` when the reference cannot run it, when it loses more than ``tolerance_points`` on
the reference, or when no runtime computes it correctly. Criterion 2 usually leaves an excluded variant's
``runtimes_ok`` empty; ``runtimes_failed`` still says what each runtime did.

**Measuring.** Variants never run in the server's process: some crash a runtime (blockwise int4 segfaults
tflite-runtime 2.14). Per runtime, a child process imports the runtime and forks one process per variant,
which loads the variant from a file (as a device does: mmap), allocates, and invokes it on every eval input.
``latency_ms`` is the median time of one invoke (batch as the model declares, one thread), the first,
warm-up invoke not counted. ``peak_memory_bytes``: the forked process notes its resident set size, resets
the kernel's high-water mark (``/proc/self/clear_refs``) and reads ``VmHWM`` after the first invoke; the
growth counts the model's pages, the tensor arena, delegate buffers (XNNPACK's packed copy of the weights,
float copies of dequantized weights) and the runtime code pages the interpreter touches (6-7 MB, the same
for every model), not Python and the imports (~40 MB). Allocations that fit in heap pages already resident
are not seen, which only matters for models far smaller than the fixed part. ``peak_memory_bytes`` is the
largest figure over the runtimes that compute V correctly (over all that ran it when none do);
``peak_memory_bytes_by_runtime`` has each. Linux only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_quantizer import calibrator, qtyping, quantizer, recipe
from ai_edge_quantizer.algorithm_manager import AlgorithmName

from edgefleet import wire
from edgefleet.errors import InvalidRequestError, ModelError
from edgefleet.runtime import LITERT, available_runtimes, make_interpreter

log = logging.getLogger(__name__)

MAX_EVAL_BYTES = 64 * 2**20
EVAL_KEYS = ("x", "y", "reference")
GENERATED_SAMPLES = 64
DEFAULT_SPARSITY = (0.25, 0.5)
PRUNED_RECIPES = ("int8-dynamic-pt", "int4-dynamic")  # the smallest on the wire that both runtimes run
ATOL_RELATIVE = 1e-4  # float rounding between runtimes, relative to mean |float32 output|
REFERENCE_MATCH_ATOL = 1e-3  # the float model against the eval set's expected outputs
MEASURE_TIMEOUT_S = 3600

_OP = qtyping.TFLOperationName.ALL_SUPPORTED
_TENSORWISE = qtyping.QuantGranularity.TENSORWISE
_PRUNABLE_OPS = {
    schema.BuiltinOperator.FULLY_CONNECTED,
    schema.BuiltinOperator.CONV_2D,
    schema.BuiltinOperator.DEPTHWISE_CONV_2D,
}


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == is ambiguous.
class EvalSet:
    x: np.ndarray
    y: np.ndarray | None = None  # integer class labels, one per row of x
    reference: np.ndarray | None = None  # the float model's expected outputs, one per row of x


@dataclass(frozen=True)
class Variant:
    name: str
    model: bytes  # the .tflite file
    wire_encoding: str
    wire: bytes  # the model encoded for the wire
    details: dict[str, Any]


# ---- eval data ---------------------------------------------------------------------------------------


def _npy_shape(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a .npy header, read before numpy allocates anything for the array."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version not in readers:
            raise InvalidRequestError(
                f"eval set: {member} uses .npy format {version}; save it with numpy.savez"
            )
        shape, _, dtype = readers[version](f)
    return shape, dtype


def load_eval_npz(data: bytes, max_bytes: int = MAX_EVAL_BYTES) -> EvalSet:
    """Parse an eval set saved with ``numpy.savez(f, x=..., y=...)`` (or ``reference=`` instead of ``y``).

    No pickles, no more than `max_bytes` compressed or decompressed. Raises InvalidRequestError that says
    what to fix.
    """
    if len(data) > max_bytes:
        raise InvalidRequestError(
            f"eval set is {len(data)} bytes, over the {max_bytes} limit: send fewer rows"
        )
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = {name.removesuffix(".npy"): name for name in zf.namelist()}
            unknown = sorted(set(members) - set(EVAL_KEYS))
            if unknown or "x" not in members:
                raise InvalidRequestError(
                    f"eval set has keys {sorted(members)}: expected x plus y (labels) or reference (outputs)"
                )
            declared = sum(info.file_size for info in zf.infolist())
            if declared > max_bytes:
                raise InvalidRequestError(f"eval set unpacks to {declared} bytes, over the {max_bytes} limit")
            arrays = {}
            for key, member in members.items():
                shape, dtype = _npy_shape(zf, member)
                if dtype.hasobject or dtype.kind not in "biuf":
                    raise InvalidRequestError(f"eval set: {key} has dtype {dtype}; use numeric arrays")
                if math.prod(shape) * dtype.itemsize > zf.getinfo(member).file_size:
                    raise InvalidRequestError(f"eval set: {key}'s header claims more data than it holds")
                with zf.open(member) as f:
                    arrays[key] = np.lib.format.read_array(f, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        raise InvalidRequestError(f"eval set is not a readable .npz ({e}); save it with numpy.savez") from e

    x, y, reference = arrays["x"], arrays.get("y"), arrays.get("reference")
    if x.ndim < 2 or len(x) == 0:
        raise InvalidRequestError(f"eval set: x has shape {x.shape}; expected rows of model input, [n, ...]")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise InvalidRequestError("eval set: x contains NaN or infinity")
    if y is not None:
        if y.dtype.kind not in "iu" or y.shape != (len(x),):
            raise InvalidRequestError(
                f"eval set: y has shape {y.shape} and dtype {y.dtype}; expected {len(x)} integer labels"
            )
        if (y < 0).any():
            raise InvalidRequestError("eval set: y has negative labels; labels are class indices")
    if reference is not None:
        if len(reference) != len(x) or reference.ndim < 2:
            raise InvalidRequestError(
                f"eval set: reference has shape {reference.shape}; expected {len(x)} rows of model output"
            )
        if not np.isfinite(reference).all():
            raise InvalidRequestError("eval set: reference contains NaN or infinity")
    return EvalSet(x, y, reference)


# ---- making variants ---------------------------------------------------------------------------------

Configure = Callable[[quantizer.Quantizer], None]


def _keep_float_io(qt: quantizer.Quantizer) -> None:
    # Static quantization would otherwise turn the model's inputs and outputs into int8, and devices feed floats.
    for op in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT):
        qt.update_quantization_recipe(".*", op, None, AlgorithmName.NO_QUANTIZE)


def _static_int8(qt: quantizer.Quantizer) -> None:
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    _keep_float_io(qt)


# name -> (what it is, how to configure the quantizer). Float32 is the pushed file itself.
RECIPES: dict[str, tuple[str, Configure]] = {
    "float16": (
        "float16 weights, float compute",
        lambda qt: qt.add_weight_only_config(".*", _OP, 16, algorithm_key=AlgorithmName.FLOAT_CASTING),
    ),
    "int8-dynamic-pc": (
        "dynamic_wi8_afp32: int8 weights per channel, activations quantized at run time",
        lambda qt: qt.load_quantization_recipe(recipe.dynamic_wi8_afp32()),
    ),
    "int8-dynamic-pt": (
        "int8 weights per tensor, activations quantized at run time",
        lambda qt: qt.add_dynamic_config(".*", _OP, 8, granularity=_TENSORWISE),
    ),
    "int8-weight-only": (
        "weight_only_wi8_afp32: int8 weights per channel, dequantized to float",
        lambda qt: qt.load_quantization_recipe(recipe.weight_only_wi8_afp32()),
    ),
    "int4-dynamic": (
        "dynamic_wi4_afp32: int4 weights per channel, activations quantized at run time",
        lambda qt: qt.load_quantization_recipe(recipe.dynamic_wi4_afp32()),
    ),
    "int4-weight-only": (
        "weight_only_wi4_afp32: int4 weights per channel, dequantized to float",
        lambda qt: qt.load_quantization_recipe(recipe.weight_only_wi4_afp32()),
    ),
    "int8-static": ("static_wi8_ai8: int8 weights and activations, float inputs and outputs", _static_int8),
}


def quantize(
    model: bytes, configure: Configure, calibration: dict[str, list[dict[str, np.ndarray]]] | None = None
) -> bytes:
    """Quantize `model` with ai-edge-quantizer; `calibration` ({signature: [{input: batch}]}) feeds the
    recipes that need it (static)."""
    qt = quantizer.Quantizer(model)
    configure(qt)
    result = None
    if qt.need_calibration:
        if calibration is None:
            raise InvalidRequestError("this recipe needs calibration data")
        # The profiler-based calibrator is the fast one; the progress bar it draws is noise on a server.
        with contextlib.redirect_stderr(io.StringIO()):
            result = qt.calibrate(calibration, mode=calibrator.CalibrationMode.CALIBRATION_PROFILER_BASED)
    with warnings.catch_warnings():
        # With a calibration result the quantizer opens a debug interpreter only to list tensor names.
        warnings.filterwarnings(
            "ignore", "Warning: Enabling `experimental_preserve_all_tensors`", UserWarning
        )
        # A pruned channel or block that is all zeros gets scale 0 and the quantizer computes 0/0 for it;
        # harmless, since every value of it dequantizes to q * 0 = 0.
        with np.errstate(divide="ignore", invalid="ignore"):
            return bytes(qt.quantize(result, enable_progress_report=False).quantized_model)


def prune(model: bytes, sparsity: float) -> bytes:
    """Zero the `sparsity` fraction of smallest-magnitude weights of each float FULLY_CONNECTED/CONV layer.

    The weights are edited in place in a copy of the file, so its layout (and alignment) stays as it was.
    """
    out = bytearray(model)
    root = schema.Model.GetRootAs(out)
    pruned = set()
    for s in range(root.SubgraphsLength()):
        subgraph = root.Subgraphs(s)
        for o in range(subgraph.OperatorsLength()):
            op = subgraph.Operators(o)
            code = root.OperatorCodes(op.OpcodeIndex())
            if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) not in _PRUNABLE_OPS:
                continue
            tensor = subgraph.Tensors(op.Inputs(1))
            buffer = root.Buffers(tensor.Buffer())
            if tensor.Type() != schema.TensorType.FLOAT32 or buffer.DataIsNone() or tensor.Buffer() in pruned:
                continue
            pruned.add(tensor.Buffer())
            weights = buffer.DataAsNumpy().view("<f4")  # a writable view into `out`
            k = round(sparsity * weights.size)
            weights[np.argpartition(np.abs(weights), k)[:k]] = 0.0
    return bytes(out)


# ---- running and measuring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Io:
    """The model's single input and output, as the reference runtime reports them."""

    input_shape: tuple[int, ...]
    input_dtype: np.dtype
    output_shape: tuple[int, ...]


def _describe_io(model: bytes, runtime: str) -> _Io:
    try:
        interpreter = make_interpreter(runtime, model_content=model)
    except (ValueError, RuntimeError) as e:
        raise ModelError(f"the model does not load on {runtime}: {e}") from e
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise InvalidRequestError(
            f"compression handles one input and one output; the model has {len(inputs)} and {len(outputs)}"
        )
    return _Io(tuple(inputs[0]["shape"]), np.dtype(inputs[0]["dtype"]), tuple(outputs[0]["shape"]))


def _batches(x: np.ndarray, batch: int) -> list[np.ndarray]:
    """Rows of x in chunks of the model's batch size; the last one zero-padded."""
    chunks = []
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        chunks.append(np.pad(chunk, [(0, batch - len(chunk))] + [(0, 0)] * (x.ndim - 1)))
    return chunks


@dataclass(frozen=True, eq=False)
class Measured:
    """One variant on one runtime: its outputs on the eval inputs, or why there are none."""

    error: str = ""
    outputs: np.ndarray | None = None
    latency_ms: float = 0.0
    peak_memory_bytes: int = 0
    model_memory_bytes: int = 0  # peak_memory_bytes less the runtime's fixed cost (see `measure`)


def measure(
    models: dict[str, bytes], x: np.ndarray, runtimes: tuple[str, ...]
) -> dict[str, dict[str, Measured]]:
    """Run every model on every runtime over x, one child process per runtime (see `_measure_in_child`).

    Models never run in this process: some variants crash a runtime (blockwise int4 segfaults
    tflite-runtime 2.14), and that must cost one variant, not the server.
    """
    with tempfile.TemporaryDirectory(prefix="edgefleet-variants-") as tmp:
        work = Path(tmp)
        np.save(work / "x.npy", x)
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
        with np.load(result) as saved:
            return Measured("", saved["outputs"], float(saved["latency_ms"]), int(saved["peak_memory_bytes"]))
    if error.exists():
        return Measured(error.read_text())
    return Measured(f"not measured: {problem.strip()[-300:] or 'the measuring process stopped'}")


_CHILD_COMMAND = "from edgefleet.server.compression import _measure_in_child; _measure_in_child()"
BASELINE = "__runtime_baseline__"


def _baseline_model() -> bytes:
    """One 1x1 fully connected layer: loading it costs what any model costs, and nothing more."""
    from edgefleet.server.tflite_writer import mlp_to_tflite

    return mlp_to_tflite([(np.ones((1, 1), np.float32), np.zeros(1, np.float32))])


def _measure_in_child() -> None:
    """Measuring process (argv: runtime, work directory, variant names); writes <runtime>/<name>.npz.

    It imports the runtime once, then forks one process per variant, so each variant starts where no
    interpreter ever existed (its memory is its own), and one that crashes the runtime only loses itself.
    """
    runtime, work, names = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    x = np.load(work / "x.npy")
    inputs = {BASELINE: np.zeros((1, 1), np.float32)}
    available_runtimes()  # import the runtimes before any memory baseline
    for name in names:
        result, error = work / runtime / f"{name}.npz", work / runtime / f"{name}.error"
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                outputs, latency_ms, peak = _run(runtime, work / f"{name}.tflite", inputs.get(name, x))
                np.savez(result, outputs=outputs, latency_ms=latency_ms, peak_memory_bytes=peak)
            except Exception as e:  # the runtime's own errors come as ValueError, RuntimeError, ...
                error.write_text(f"does not load or run: {_first_line(e)}")
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


def _run(runtime: str, model_path: Path, x: np.ndarray) -> tuple[np.ndarray, float, int]:
    """Outputs for every row of x, the median ms per invoke after the first, and the peak memory growth of
    loading, allocating and the first invoke (see the module docstring)."""
    before = _status("VmRSS")
    with contextlib.suppress(OSError):  # without the reset VmHWM keeps the imports' peak: an upper bound
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from the current RSS
    interpreter = make_interpreter(runtime, model_path=str(model_path))
    (input_detail,) = interpreter.get_input_details()
    (output_detail,) = interpreter.get_output_details()
    outputs, seconds, peak = [], [], 0
    for chunk in _batches(x, int(input_detail["shape"][0])):
        interpreter.set_tensor(input_detail["index"], chunk.astype(input_detail["dtype"]))
        start = time.perf_counter()
        interpreter.invoke()
        seconds.append(time.perf_counter() - start)
        peak = peak or _status("VmHWM") - before  # before the outputs kept here add to it
        outputs.append(interpreter.get_tensor(output_detail["index"]).astype(np.float64))
    return np.concatenate(outputs)[: len(x)], 1000 * float(np.median(seconds[1:] or seconds)), peak


# ---- judging -----------------------------------------------------------------------------------------


class _Judge:
    """Points lost against the float32 model (see the module docstring)."""

    def __init__(self, float_outputs: np.ndarray, labels: np.ndarray | None) -> None:
        self.float_outputs = float_outputs
        self.labels = labels
        if labels is not None:
            self.judged_by = "accuracy"
            self.float_accuracy = self.accuracy(float_outputs)
        else:
            self.judged_by = "mean abs error in % of float32's"
            self.scale = max(float(np.mean(np.abs(float_outputs))), np.finfo(np.float32).tiny)

    def accuracy(self, outputs: np.ndarray) -> float:
        return float(np.mean(outputs.reshape(len(outputs), -1).argmax(axis=1) == self.labels))

    def points_lost(self, outputs: np.ndarray) -> float:
        if self.labels is not None:
            return 100 * (self.float_accuracy - self.accuracy(outputs))
        return 100 * float(np.mean(np.abs(outputs - self.float_outputs))) / self.scale


def _judge_runtimes(
    outputs: dict[str, np.ndarray], reference: str, judge: _Judge, tolerance_points: float
) -> tuple[list[str], dict[str, str]]:
    """Which runtimes compute the variant correctly, and why the others do not (criteria 2 and 3)."""
    ok, failed = [], {}
    ref = outputs[reference]
    own_error = float(np.mean(np.abs(ref - judge.float_outputs)))
    atol = ATOL_RELATIVE * float(np.mean(np.abs(judge.float_outputs)))
    for runtime, out in outputs.items():
        if not np.isfinite(out).all():
            failed[runtime] = "wrong results: outputs are not finite"
            continue
        lost = judge.points_lost(out)
        disagreement = float(np.mean(np.abs(out - ref)))
        if lost > tolerance_points:
            failed[runtime] = (
                f"wrong results: {lost:.2f} points lost ({judge.judged_by}), "
                f"over the {tolerance_points} point tolerance"
            )
        elif disagreement > 2 * own_error + atol:
            failed[runtime] = (
                f"wrong results: outputs differ from {reference}'s by {disagreement:.3g} on average, over "
                f"twice the variant's own error against float32 ({own_error:.3g})"
            )
        else:
            ok.append(runtime)
    return ok, failed


def _inputs(spec: _Io, eval_set: EvalSet | None) -> np.ndarray:
    """The eval inputs, checked against the model; generated when there is no eval set."""
    if eval_set is None:
        rng = np.random.default_rng(0)
        shape = (GENERATED_SAMPLES, *spec.input_shape[1:])
        if spec.input_dtype.kind == "f":
            return rng.standard_normal(shape).astype(spec.input_dtype)
        info = np.iinfo(spec.input_dtype)
        return rng.integers(info.min, info.max, shape, endpoint=True).astype(spec.input_dtype)
    classes = math.prod(spec.output_shape[1:])
    if eval_set.y is not None and eval_set.y.max() >= classes:
        raise InvalidRequestError(f"eval y has label {eval_set.y.max()}; the model outputs {classes} classes")
    return _check_rows(eval_set.x, spec, "eval x")


def _check_rows(x: np.ndarray, spec: _Io, what: str) -> np.ndarray:
    if tuple(x.shape[1:]) != spec.input_shape[1:]:
        raise InvalidRequestError(
            f"{what} has rows of shape {tuple(x.shape[1:])}; the model's input takes {spec.input_shape[1:]}"
        )
    if not np.can_cast(x.dtype, spec.input_dtype, casting="same_kind"):
        raise InvalidRequestError(f"{what} has dtype {x.dtype}; the model's input is {spec.input_dtype}")
    return x.astype(spec.input_dtype)


def _check_reference_outputs(eval_set: EvalSet | None, float_outputs: np.ndarray) -> None:
    """The eval set's expected outputs must be what the pushed model computes (its golden data)."""
    if eval_set is None or eval_set.reference is None:
        return
    if eval_set.reference.shape != float_outputs.shape:
        raise InvalidRequestError(
            f"eval reference has shape {eval_set.reference.shape}; the model outputs {float_outputs.shape}"
        )
    diff = float(np.max(np.abs(float_outputs - eval_set.reference)))
    if diff > REFERENCE_MATCH_ATOL * (1 + float(np.max(np.abs(eval_set.reference)))):
        raise ModelError(
            f"the model's outputs differ from the eval set's reference outputs by up to {diff:.3g}"
        )


def _make_models(
    model: bytes, calibration: dict[str, list[dict[str, np.ndarray]]] | None, sparsity: tuple[float, ...]
) -> list[tuple[str, str, bytes]]:
    """(name, recipe, .tflite) of every variant ai-edge-quantizer makes of this model."""
    made = [("float32", "the pushed float32 model, unchanged", model)]

    def add(name: str, recipe_name: str, description: str, source: bytes) -> None:
        try:
            made.append((name, description, quantize(source, RECIPES[recipe_name][1], calibration)))
        except Exception as e:  # the quantizer cannot handle every model: ship the variants it can make
            log.warning("variant %s not built: %s", name, e)

    for name, (description, _) in RECIPES.items():
        if name != "int8-static" or calibration is not None:
            add(name, name, f"ai-edge-quantizer {description}", model)
    for level in sparsity:
        pruned = prune(model, level)
        if pruned == model:  # nothing to prune
            continue
        percent = round(level * 100)
        for name in PRUNED_RECIPES:
            description = f"{percent} % of FC/conv weights zeroed by magnitude, then {RECIPES[name][0]}"
            add(f"pruned{percent}-{name}", name, description, pruned)
    return made


def _calibration_data(model: bytes, rows: np.ndarray, batch: int) -> dict[str, list[dict[str, np.ndarray]]]:
    """Calibration rows in ai-edge-quantizer's form: {signature: [{input name: batch}, ...]}."""
    signatures = make_interpreter(LITERT, model_content=model).get_signature_list()
    if not signatures:
        raise InvalidRequestError("static quantization needs a model with a signature")
    key, signature = next(iter(signatures.items()))
    (input_name,) = signature["inputs"]
    return {key: [{input_name: chunk} for chunk in _batches(rows, batch)]}


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def build_variants(
    model: bytes,
    eval_set: EvalSet | None,
    *,
    tolerance_points: float = 1.0,
    calibration: np.ndarray | None = None,
    sparsity: tuple[float, ...] = DEFAULT_SPARSITY,
    runtimes: tuple[str, ...] | None = None,
) -> list[Variant]:
    """The float32 model and its compressed variants, each measured on every runtime (see module docstring).

    `calibration` holds model inputs (rows like eval x) for static int8, which is only built with them.
    `sparsity` lists the magnitude-pruning levels, each combined with the `PRUNED_RECIPES`. `runtimes`
    defaults to the installed ones. Raises InvalidRequestError for eval data that does not fit the model
    and ModelError when the model does not run on the reference runtime.
    """
    runtimes = tuple(runtimes or available_runtimes())
    reference = LITERT if LITERT in runtimes else runtimes[0]
    if any(not 0 < level < 1 for level in sparsity):
        raise InvalidRequestError(f"sparsity levels must be between 0 and 1, got {sparsity}")
    spec = _describe_io(model, reference)
    x = _inputs(spec, eval_set)
    rows = None if calibration is None else _check_rows(calibration, spec, "calibration x")
    calibration_data = None if rows is None else _calibration_data(model, rows, spec.input_shape[0])
    made = _make_models(model, calibration_data, sparsity)
    measured = measure({name: variant_model for name, _, variant_model in made}, x, runtimes)

    float_run = measured["float32"][reference]
    if float_run.error:
        raise ModelError(f"the model does not run on {reference}: {float_run.error}")
    _check_reference_outputs(eval_set, float_run.outputs)
    judge = _Judge(float_run.outputs, eval_set.y if eval_set is not None else None)
    return [
        _variant(name, description, variant_model, measured[name], reference, judge, tolerance_points)
        for name, description, variant_model in made
    ]


def _variant(
    name: str,
    description: str,
    model: bytes,
    runs: dict[str, Measured],
    reference: str,
    judge: _Judge,
    tolerance_points: float,
) -> Variant:
    """The variant with its details (the keys `server.variants` reads)."""
    ran = {runtime: run for runtime, run in runs.items() if not run.error}
    encoding, encoded = wire.best_encoding(model)
    details: dict[str, Any] = {
        "variant": name,
        "recipe": description,
        "size_bytes": len(model),
        "wire_bytes": len(encoded),
        "wire_encoding": encoding,
        "wire_sha256": hashlib.sha256(encoded).hexdigest(),
        "judged_by": judge.judged_by,
        "accuracy": None,
        "accuracy_delta_points": None,
        "max_abs_error": None,
        "mean_abs_error": None,
        "latency_ms": {runtime: run.latency_ms for runtime, run in ran.items()},
        "peak_memory_bytes": 0,
        "peak_memory_bytes_by_runtime": {runtime: run.peak_memory_bytes for runtime, run in ran.items()},
        "model_memory_bytes": 0,
        "model_memory_bytes_by_runtime": {runtime: run.model_memory_bytes for runtime, run in ran.items()},
        "runtimes_ok": [],
        "runtimes_failed": {runtime: run.error for runtime, run in runs.items() if run.error},
        "excluded": f"the reference runtime {reference} cannot run it",
    }
    if reference in ran:
        outputs = {runtime: run.outputs for runtime, run in ran.items()}
        ok, wrong = _judge_runtimes(outputs, reference, judge, tolerance_points)
        error = np.abs(outputs[reference] - judge.float_outputs)
        lost = judge.points_lost(outputs[reference])
        counted = [ran[runtime].peak_memory_bytes for runtime in ok or ran]
        counted_model = [ran[runtime].model_memory_bytes for runtime in ok or ran]
        if lost > tolerance_points:
            excluded = (
                f"{lost:.2f} points lost ({judge.judged_by}), over the {tolerance_points} point tolerance"
            )
        else:
            excluded = "" if ok else "no runtime computes it correctly"
        details.update(
            accuracy=judge.accuracy(outputs[reference]) if judge.labels is not None else None,
            accuracy_delta_points=lost,
            max_abs_error=float(error.max()),
            mean_abs_error=float(error.mean()),
            peak_memory_bytes=max(counted),
            model_memory_bytes=max(counted_model),
            runtimes_ok=ok,
            runtimes_failed=details["runtimes_failed"] | wrong,
            excluded=excluded,
        )
    return Variant(name, model, encoding, encoded, details)
