"""Measure the compressed variants of the digits model and of a ~30 MiB generated model.

Run: ``.venv/bin/python bench/variants.py``. Prints, per model, what `server.compression.build_variants`
measures (sizes against float32, loss, latency per runtime, peak memory, runtimes that compute it
correctly), then searches pruning x quantization x wire encoding on digits for a variant at least 10x
smaller on the wire than float32 that loses at most 1 accuracy point, without retraining.
"""

from __future__ import annotations

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
    runs = compression.measure(models, data.x_test, RUNTIMES)

    def lost(name: str) -> dict[str, float]:
        """Points lost per runtime (infinite where it does not run)."""
        return {
            runtime: 100 * (float_accuracy - np.mean(run.outputs.argmax(axis=1) == data.y_test))
            if not run.error
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


def main() -> None:
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


if __name__ == "__main__":
    main()
