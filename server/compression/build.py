"""`build_variants`: every variant of a pushed model, made, measured on every runtime and judged."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet import wire
from edgefleet.errors import InvalidRequestError, ModelError
from edgefleet.runtime import LITERT, available_runtimes, make_interpreter
from edgefleet.server.compression import recipes
from edgefleet.server.compression.evalsets import EvalSet
from edgefleet.server.compression.judging import Judge, judge_runtimes
from edgefleet.server.compression.measuring import Measured, batches, measure

log = logging.getLogger(__name__)

GENERATED_SAMPLES = 64
DEFAULT_SPARSITY = (0.25, 0.5)
PRUNED_RECIPES = ("int8-dynamic-pt", "int4-dynamic")  # the smallest on the wire that both runtimes run
REFERENCE_MATCH_ATOL = 1e-3  # the float model against the eval set's expected outputs


@dataclass(frozen=True)
class Variant:
    name: str
    model: bytes  # the .tflite file
    wire_encoding: str
    wire: bytes  # the model encoded for the wire
    details: dict[str, Any]


@dataclass(frozen=True)
class TensorIo:
    """The model's single input and output, as the reference runtime reports them."""

    input_shape: tuple[int, ...]
    input_dtype: np.dtype
    output_shape: tuple[int, ...]


def describe_io(model: bytes, runtime: str) -> TensorIo:
    try:
        interpreter = make_interpreter(runtime, model_content=model)
    except (ValueError, RuntimeError) as e:
        raise ModelError(f"the model does not load on {runtime}: {e}") from e
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise InvalidRequestError(
            f"compression handles one input and one output; the model has {len(inputs)} and {len(outputs)}"
        )
    return TensorIo(tuple(inputs[0]["shape"]), np.dtype(inputs[0]["dtype"]), tuple(outputs[0]["shape"]))


def _inputs(spec: TensorIo, eval_set: EvalSet | None) -> np.ndarray:
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


def _check_rows(x: np.ndarray, spec: TensorIo, what: str) -> np.ndarray:
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
            made.append(
                (name, description, recipes.quantize(source, recipes.RECIPES[recipe_name][1], calibration))
            )
        except Exception as e:  # the quantizer cannot handle every model: ship the variants it can make
            log.warning("variant %s not built: %s", name, e)

    for name, (description, _) in recipes.RECIPES.items():
        if name != "int8-static" or calibration is not None:
            add(name, name, f"ai-edge-quantizer {description}", model)
    for level in sparsity:
        pruned = recipes.prune(model, level)
        if pruned == model:  # nothing to prune
            continue
        percent = round(level * 100)
        for name in PRUNED_RECIPES:
            description = (
                f"{percent} % of FC/conv weights zeroed by magnitude, then {recipes.RECIPES[name][0]}"
            )
            add(f"pruned{percent}-{name}", name, description, pruned)
    return made


def _calibration_data(model: bytes, rows: np.ndarray, batch: int) -> dict[str, list[dict[str, np.ndarray]]]:
    """Calibration rows in ai-edge-quantizer's form: {signature: [{input name: batch}, ...]}."""
    signatures = make_interpreter(LITERT, model_content=model).get_signature_list()
    if not signatures:
        raise InvalidRequestError("static quantization needs a model with a signature")
    key, signature = next(iter(signatures.items()))
    (input_name,) = signature["inputs"]
    return {key: [{input_name: chunk} for chunk in batches(rows, batch)]}


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
    spec = describe_io(model, reference)
    x = _inputs(spec, eval_set)
    rows = None if calibration is None else _check_rows(calibration, spec, "calibration x")
    calibration_data = None if rows is None else _calibration_data(model, rows, spec.input_shape[0])
    made = _make_models(model, calibration_data, sparsity)
    measured = measure({name: variant_model for name, _, variant_model in made}, x, runtimes)

    float_run = measured["float32"][reference]
    if float_run.error:
        raise ModelError(f"the model does not run on {reference}: {float_run.error}")
    _check_reference_outputs(eval_set, float_run.outputs)
    judge = Judge(float_run.outputs, eval_set.y if eval_set is not None else None)
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
    judge: Judge,
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
        ok, wrong = judge_runtimes(outputs, reference, judge, tolerance_points)
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
