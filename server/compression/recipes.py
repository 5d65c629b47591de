"""How each variant is made: ai-edge-quantizer recipes by name, and magnitude pruning."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_quantizer import calibrator, qtyping, quantizer, recipe
from ai_edge_quantizer.algorithm_manager import AlgorithmName

from edgefleet.errors import InvalidRequestError

ALL_OPS = qtyping.TFLOperationName.ALL_SUPPORTED
_TENSORWISE = qtyping.QuantGranularity.TENSORWISE
# Not depthwise convolutions: few weights that each do much (on the MediaPipe landmark models pruning them
# too doubles the error for a 0.5 % smaller file).
_PRUNABLE_OPS = {schema.BuiltinOperator.FULLY_CONNECTED, schema.BuiltinOperator.CONV_2D}

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
        lambda qt: qt.add_weight_only_config(".*", ALL_OPS, 16, algorithm_key=AlgorithmName.FLOAT_CASTING),
    ),
    "int8-dynamic-pc": (
        "dynamic_wi8_afp32: int8 weights per channel, activations quantized at run time",
        lambda qt: qt.load_quantization_recipe(recipe.dynamic_wi8_afp32()),
    ),
    "int8-dynamic-pt": (
        "int8 weights per tensor, activations quantized at run time",
        lambda qt: qt.add_dynamic_config(".*", ALL_OPS, 8, granularity=_TENSORWISE),
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
        # Its progress bars ignore enable_progress_report and draw on stderr: noise on a server.
        with np.errstate(divide="ignore", invalid="ignore"), contextlib.redirect_stderr(io.StringIO()):
            return bytes(qt.quantize(result, enable_progress_report=False).quantized_model)


def prune(model: bytes, sparsity: float) -> bytes:
    """Zero the `sparsity` fraction of smallest-magnitude weights of each float FULLY_CONNECTED/CONV_2D layer
    (float16 weights are folded to float32 first: `normalize`).

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
