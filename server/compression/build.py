"""`build_variants`: every variant of a pushed model, made, measured on every runtime and judged."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet import wire
from edgefleet.errors import InvalidRequestError, ModelError
from edgefleet.modelfile import check_runnable, read_facts
from edgefleet.runtime import LITERT, available_runtimes, make_interpreter
from edgefleet.server.compression import recipes
from edgefleet.server.compression.evalsets import EvalSet, ModelIo, TensorInfo
from edgefleet.server.compression.judging import Judge, all_finite, judge_runtimes
from edgefleet.server.compression.measuring import Measured, batches, measure
from edgefleet.server.compression.normalize import normalize

log = logging.getLogger(__name__)

GENERATED_SAMPLES = 64
MIN_GENERATED_SAMPLES = 8
GENERATED_BYTES = 8 * 2**20  # generated eval inputs for an image model: fewer rows, not hours of measuring
DEFAULT_SPARSITY = (0.25, 0.5)
# The smallest on the wire that both runtimes run (per-tensor int8 on MLPs), and the int8 that survives
# pruning on CNNs (per-tensor dynamic int8 overflows on depthwise convolutions).
PRUNED_RECIPES = ("int8-dynamic-pt", "int4-dynamic", "int8-weight-only")
REFERENCE_MATCH_ATOL = 1e-3  # the float model against the eval set's expected outputs


@dataclass(frozen=True)
class Variant:
    name: str
    model: bytes  # the .tflite file
    wire_encoding: str
    wire: bytes  # the model encoded for the wire
    details: dict[str, Any]


def describe_io(model: bytes, runtime: str) -> ModelIo:
    """The model's inputs and outputs as `runtime` reports them. Raises IncompatibleError / ModelError."""
    try:
        interpreter = make_interpreter(runtime, model_content=model)
    except (ValueError, RuntimeError) as e:
        raise ModelError(f"the model does not load on {runtime}: {e}") from e

    def info(d: dict[str, Any]) -> TensorInfo:
        scale, zero_point = d["quantization"]
        return TensorInfo(
            d["name"], tuple(int(n) for n in d["shape"]), np.dtype(d["dtype"]), scale, zero_point
        )

    return ModelIo(
        tuple(info(d) for d in interpreter.get_input_details()),
        tuple(info(d) for d in interpreter.get_output_details()),
    )


def generated_inputs(io_: ModelIo, samples: int = GENERATED_SAMPLES) -> dict[str, np.ndarray]:
    """Deterministic eval inputs of each input's shape and dtype: seeded N(0, 1) floats, uniform integers
    over the dtype's range. Fewer rows for large inputs, at most GENERATED_BYTES in all."""
    row_bytes = sum(math.prod(t.shape[1:]) * t.dtype.itemsize for t in io_.inputs)
    rows = max(MIN_GENERATED_SAMPLES, min(samples, GENERATED_BYTES // max(row_bytes, 1)))
    rng = np.random.default_rng(0)
    generated = {}
    for t in io_.inputs:
        shape = (rows, *t.shape[1:])
        if t.dtype.kind == "f":
            generated[t.name] = rng.standard_normal(shape).astype(t.dtype)
        elif t.dtype.kind == "b":
            generated[t.name] = rng.integers(0, 2, shape).astype(t.dtype)
        else:
            limits = np.iinfo(t.dtype)
            generated[t.name] = rng.integers(limits.min, limits.max, shape, endpoint=True).astype(t.dtype)
    return generated


def _check_reference_outputs(references: dict[str, np.ndarray], float_outputs: dict[str, np.ndarray]) -> None:
    """The eval set's expected outputs must be what the pushed model computes (its golden data)."""
    for name, reference in references.items():
        diff = float(np.max(np.abs(float_outputs[name] - reference)))
        if diff > REFERENCE_MATCH_ATOL * (1 + float(np.max(np.abs(reference)))):
            what = "the eval set's reference outputs" + (f" for {name!r}" if len(float_outputs) > 1 else "")
            raise ModelError(f"the model's outputs differ from {what} by up to {diff:.3g}")


def _make_models(
    model: bytes, calibration: dict[str, list[dict[str, np.ndarray]]] | None, sparsity: tuple[float, ...]
) -> list[tuple[str, str, bytes]]:
    """(name, recipe, .tflite) of every variant ai-edge-quantizer makes of this model: quantized and pruned
    from its normalized copy (`normalize`: real op codes, float16 weights folded to float32)."""
    made = [("float32", "the pushed float32 model, unchanged", model)]
    model = normalize(model)

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
                f"{percent} % of FC/conv2d weights zeroed by magnitude, then {recipes.RECIPES[name][0]}"
            )
            add(f"pruned{percent}-{name}", name, description, pruned)
    return made


def _calibration_data(
    model: bytes, rows: dict[str, np.ndarray], batch: int
) -> dict[str, list[dict[str, np.ndarray]]]:
    """Calibration rows in ai-edge-quantizer's form: {signature: [{input name: batch}, ...]}."""
    signatures = make_interpreter(LITERT, model_content=model).get_signature_list()
    if not signatures:
        raise InvalidRequestError("static quantization needs a model with a signature")
    key, signature = next(iter(signatures.items()))
    if len(signature["inputs"]) != len(rows):
        raise InvalidRequestError(
            f"calibration gives {len(rows)} inputs; the model's signature has {len(signature['inputs'])}"
        )
    # The signature's input names are not the tensor names; both list the inputs in the same order.
    chunked = [batches(array, batch) for array in rows.values()]
    return {key: [dict(zip(signature["inputs"], step, strict=True)) for step in zip(*chunked, strict=True)]}


def build_variants(
    model: bytes,
    eval_set: EvalSet | None,
    *,
    tolerance_points: float = 1.0,
    calibration: np.ndarray | EvalSet | None = None,
    sparsity: tuple[float, ...] = DEFAULT_SPARSITY,
    runtimes: tuple[str, ...] | None = None,
) -> list[Variant]:
    """The pushed model and its compressed variants, each measured on every runtime (see the package
    docstring).

    `calibration` holds model inputs for static int8, which is only built with them: rows like eval x for
    a single-input model, or an EvalSet (named form for several inputs). `sparsity` lists the
    magnitude-pruning levels, each combined with the `PRUNED_RECIPES`. `runtimes` defaults to the installed
    ones. A model that is already quantized gets no variants but itself (``compression`` in its details
    says why). Raises InvalidRequestError for eval data that does not fit the model, IncompatibleError for
    ops no runtime here has, and ModelError when the model does not run on the reference runtime.
    """
    runtimes = tuple(runtimes or available_runtimes())
    reference = LITERT if LITERT in runtimes else runtimes[0]
    if any(not 0 < level < 1 for level in sparsity):
        raise InvalidRequestError(f"sparsity levels must be between 0 and 1, got {sparsity}")
    facts = read_facts(model)
    check_runnable(facts)
    io_ = describe_io(model, reference)
    bound = eval_set.bind(io_) if eval_set is not None else None
    inputs = bound.inputs if bound is not None else generated_inputs(io_)
    if facts.already_quantized:
        made = [("float32", "the pushed model, unchanged (already quantized)", model)]
        note = (
            f"already quantized ({facts.quantized_tensors} quantized tensors): no quantized variants built, "
            "quantizing again would only lose accuracy"
        )
    else:
        calibration_data = None
        if calibration is not None:
            calibration_set = calibration if isinstance(calibration, EvalSet) else EvalSet(calibration)
            rows = calibration_set.bind(io_, "calibration").inputs
            calibration_data = _calibration_data(model, rows, io_.inputs[0].shape[0])
        made = _make_models(model, calibration_data, sparsity)
        note = "float16 weights folded to float32 before quantizing" if facts.float16_weights else ""
    measured = measure({name: variant_model for name, _, variant_model in made}, inputs, runtimes)

    float_run = measured["float32"][reference]
    if float_run.error:
        raise ModelError(f"the model does not run on {reference}: {float_run.error}")
    names = [t.name for t in io_.outputs]
    float_outputs = _named(float_run.outputs, names)
    if bound is not None:
        _check_reference_outputs(bound.references, float_outputs)
    steps = {t.name: t.scale for t in io_.outputs if t.scale}
    judge = Judge(float_outputs, bound.labels if bound is not None else {}, steps)
    variants = []
    for name, description, variant_model in made:
        runs = {runtime: _renamed(run, names) for runtime, run in measured[name].items()}
        variant = _variant(name, description, variant_model, runs, reference, judge, tolerance_points)
        variant.details["compression"] = note
        variants.append(variant)
    return variants


def _named(outputs: dict[str, np.ndarray] | None, names: list[str]) -> dict[str, np.ndarray]:
    """Outputs keyed by the pushed model's output names; by position when a variant renamed them."""
    assert outputs is not None
    if set(outputs) == set(names):
        return {name: outputs[name] for name in names}
    return dict(zip(names, outputs.values(), strict=True))


def _renamed(run: Measured, names: list[str]) -> Measured:
    if run.error or run.outputs is None:
        return run
    if len(run.outputs) != len(names):
        return dataclasses.replace(run, error=f"gives {len(run.outputs)} outputs, the model {len(names)}")
    return dataclasses.replace(run, outputs=_named(run.outputs, names))


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
        "limited_by": None,  # the output whose points lost are the variant's
        "outputs": {},  # per output: metric, points_lost, max/mean abs error, relative_l2, accuracy
        "output_points_lost_by_runtime": {},  # {runtime: {output: points lost}}, finite runs only
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
        outputs = {runtime: run.outputs for runtime, run in ran.items() if run.outputs is not None}
        ok, wrong = judge_runtimes(outputs, reference, judge, tolerance_points)
        ref_outputs = outputs[reference]
        finite = all_finite(ref_outputs)
        figures = judge.figures(ref_outputs) if finite else {}
        error = np.concatenate(
            [np.abs(ref_outputs[n] - judge.float_outputs[n]).ravel() for n in judge.float_outputs]
        )
        lost, limited_by = judge.points_lost(ref_outputs) if finite else (float("inf"), "")
        counted = [ran[runtime].peak_memory_bytes for runtime in ok or ran]
        counted_model = [ran[runtime].model_memory_bytes for runtime in ok or ran]
        if not finite:
            bad = sorted(n for n, out in ref_outputs.items() if not np.isfinite(out).all())
            excluded = f"its outputs on {reference} are not finite ({', '.join(bad)})"
        elif lost > tolerance_points:
            where = f" on {limited_by}" if len(judge.float_outputs) > 1 else ""
            excluded = (
                f"{lost:.2f} points lost ({judge.metrics[limited_by]}){where}, over the {tolerance_points} "
                "point tolerance"
            )
        else:
            excluded = "" if ok else "no runtime computes it correctly"
        details.update(
            accuracy=judge.accuracy(ref_outputs) if finite else None,
            accuracy_delta_points=lost if finite else None,
            limited_by=limited_by or None,
            outputs={n: f.to_json() for n, f in figures.items()},
            output_points_lost_by_runtime={
                runtime: {n: judge.output_points_lost(n, outs[n]) for n in judge.float_outputs}
                for runtime, outs in outputs.items()
                if all_finite(outs)
            },
            max_abs_error=float(error.max()) if finite else None,
            mean_abs_error=float(error.mean()) if finite else None,
            peak_memory_bytes=max(counted),
            model_memory_bytes=max(counted_model),
            runtimes_ok=ok,
            runtimes_failed=details["runtimes_failed"] | wrong,
            excluded=excluded,
        )
    return Variant(name, model, encoding, encoded, details)
