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
