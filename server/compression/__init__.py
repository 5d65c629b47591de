"""Server-side model compression: build the variants of a pushed float model and measure each one.

`build_variants` quantizes the model with ai-edge-quantizer (float16, dynamic-range int8 per channel and
per tensor, weight-only int8 and int4, dynamic int4, static int8 when calibration data is given) and
magnitude-prunes it before quantizing (``pruned<percent>-<recipe>``). Every variant is run on every
runtime over the eval inputs and the figures go into ``Variant.details`` (read by `server.variants`).

Before quantizing, the model is normalized (`normalize`): files older than schema 3a name their ops in
the deprecated field only, and float16 weights sit behind DEQUANTIZE ops; either way the quantizer would
quantize nothing. A model that is already quantized (int8 weights or quantized tensors, `edgefleet.modelfile`)
gets no quantized variants, only itself, and ``compression`` in its details says so. A model with ops no
runtime here has (Flex, Edge TPU, unknown custom ops) is refused with IncompatibleError naming them.

Eval sets name their tensors (`evalsets` has the format): any number of inputs and outputs. Without one,
inputs are generated (`build.generated_inputs`: seeded N(0, 1) floats, uniform integers over an integer
input's range, 8-64 rows, at most 8 MiB). Variants measured on generated inputs are judged and may be
assigned like any other: without labels the rule is the error against float32's outputs, not accuracy.

How a variant is judged ("points lost", always against the pushed model on the reference runtime), output
by output: an output with labels by accuracy, float32's minus the variant's in percentage points; one
without by the mean absolute difference from float32's as a percentage of mean ``|float32 output|``.
Quantized outputs are compared as the values they stand for (scale and zero point). The variant's
``accuracy_delta_points`` is its worst output's, ``limited_by`` names that output, and ``outputs`` holds per
output ``metric``, ``points_lost``, ``max_abs_error``, ``mean_abs_error``, ``relative_l2`` and ``accuracy``;
``output_points_lost_by_runtime`` has the points lost per output on every runtime that ran it. The tolerance
applies to every output.

**Correct on a runtime.** Runtimes differ: tflite-runtime 2.14 runs per-channel dynamic int8 without any
error but computes garbage (~10 % on digits), so correctness is measured, never inferred from op versions.
The reference runtime is ai-edge-litert (the first of `runtimes` when it is absent). Runtime R computes
variant V correctly when all of these hold:

1. R loads V, allocates its tensors and runs it on every eval input, with finite outputs;
2. V loses at most ``tolerance_points`` on R: a device never gets what is over tolerance on its runtime;
3. ``mean |out_R - out_ref| <= 2 * mean |out_ref - out_float32| + atol`` on the eval inputs, per output: R
   may disagree with the reference by rounding, but by no more than twice the variant's own error against
   float32 (atol, 1e-4 of the mean |float32 output| plus one quantization step of a quantized output,
   absorbs rounding).
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

from edgefleet.server.compression.build import (
    DEFAULT_SPARSITY,
    GENERATED_SAMPLES,
    PRUNED_RECIPES,
    Variant,
    build_variants,
)
from edgefleet.server.compression.evalsets import (
    MAX_EVAL_BYTES,
    BoundEvalSet,
    EvalSet,
    ModelIo,
    TensorInfo,
    load_eval_npz,
)
from edgefleet.server.compression.measuring import Measured, measure
from edgefleet.server.compression.recipes import RECIPES, prune, quantize

__all__ = [
    "DEFAULT_SPARSITY",
    "GENERATED_SAMPLES",
    "MAX_EVAL_BYTES",
    "PRUNED_RECIPES",
    "RECIPES",
    "BoundEvalSet",
    "EvalSet",
    "ModelIo",
    "TensorInfo",
    "Measured",
    "Variant",
    "build_variants",
    "load_eval_npz",
    "measure",
    "prune",
    "quantize",
]
