"""Write a multi-layer perceptron as a real ``.tflite`` flatbuffer, without TensorFlow.

A multi-layer perceptron is only a chain of FULLY_CONNECTED ops ending in a SOFTMAX, so its file is written
here with the object API that ``ai_edge_litert`` ships (``schema_py_generated``). The server uses it for the
smallest possible model (the runtime baseline in `compression`); edgefleet.devtools.modelgen trains the demo
models and writes them with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

Layer = tuple[np.ndarray, np.ndarray]
"""A dense layer as ``(W, b)`` with ``W`` of shape ``(in, out)`` and ``b`` of shape ``(out,)``."""

FRAMING_BYTES = 4096
"""A generous bound on what an MLP's file holds besides its weights (tables, names, padding)."""

_TFLITE_SCHEMA_VERSION = 3
_FILE_IDENTIFIER = b"TFL3"
_BUFFER_ALIGNMENT = 16  # the schema's force_align on Buffer.data
# The model's operator codes; an operator refers to its code by index into this tuple.
_OPCODES = (schema.BuiltinOperator.FULLY_CONNECTED, schema.BuiltinOperator.SOFTMAX)


class _AlignedBufferT(schema.BufferT):
    """A BufferT honouring the schema's ``force_align: 16`` on buffer data.

    The C++ builder (and so the converter) aligns constant data so kernels can read it in place;
    the Python flatbuffers library ignores ``force_align``, so we pad before the data vector.
    """

    def Pack(self, builder: flatbuffers.Builder) -> int:
        if self.data is not None:
            # The generated Pack writes the data vector first, so it lands right after this padding.
            builder.Prep(_BUFFER_ALIGNMENT, len(self.data))
        return super().Pack(builder)


def _tensor(name: str, shape: Sequence[int], buffer: int) -> schema.TensorT:
    tensor = schema.TensorT()
    tensor.name = name
    tensor.shape = list(shape)
    tensor.type = schema.TensorType.FLOAT32
    tensor.buffer = buffer
    return tensor


def _operator_code(code: int) -> schema.OperatorCodeT:
    op_code = schema.OperatorCodeT()
    op_code.builtinCode = code
    # Runtimes older than 2.4 only read the int8 field, which saturates at 127 (PLACEHOLDER_FOR_
    # GREATER_OP_CODES); newer ones take the larger of the two.
    op_code.deprecatedBuiltinCode = min(code, 127)
    op_code.version = 1
    return op_code


def _operator(
    builtin_code: int, inputs: list[int], output: int, options_type: int, options: Any
) -> schema.OperatorT:
    operator = schema.OperatorT()
    operator.opcodeIndex = _OPCODES.index(builtin_code)
    operator.inputs = inputs
    operator.outputs = [output]
    operator.builtinOptionsType = options_type
    operator.builtinOptions = options
    return operator


def _tensor_map(name: str, tensor_index: int) -> schema.TensorMapT:
    tensor_map = schema.TensorMapT()
    tensor_map.name = name
    tensor_map.tensorIndex = tensor_index
    return tensor_map


def mlp_to_tflite(
    layers: Sequence[Layer],
    input_name: str = "pixels",
    output_name: str = "probabilities",
    batch: int = 1,
) -> bytes:
    """Serialize an MLP as FULLY_CONNECTED ops (fused ReLU on hidden layers) and a final SOFTMAX.

    ``layers`` holds ``(W, b)`` with ``W`` of shape ``(in, out)``; TFLite stores FC weights as
    ``[out, in]``.  The model maps float32 ``[batch, in]`` to float32 ``[batch, n_classes]`` and
    has a ``serving_default`` signature.
    """
    buffers = [schema.BufferT()]  # buffer 0 is the empty sentinel the schema requires
    tensors = [_tensor(input_name, [batch, layers[0][0].shape[0]], buffer=0)]
    operators = []

    def add_constant(name: str, value: np.ndarray) -> int:
        buffer = _AlignedBufferT()
        buffer.data = np.ascontiguousarray(value, dtype="<f4").reshape(-1).view(np.uint8)
        buffers.append(buffer)
        tensors.append(_tensor(name, value.shape, buffer=len(buffers) - 1))
        return len(tensors) - 1

    for i, (w, b) in enumerate(layers):
        is_last = i == len(layers) - 1
        layer_input = len(tensors) - 1
        weights = add_constant(f"dense_{i}/weights", w.T)
        bias = add_constant(f"dense_{i}/bias", b)
        tensors.append(_tensor(f"dense_{i}/{'logits' if is_last else 'relu'}", [batch, w.shape[1]], buffer=0))

        options = schema.FullyConnectedOptionsT()
        options.fusedActivationFunction = (
            schema.ActivationFunctionType.NONE if is_last else schema.ActivationFunctionType.RELU
        )
        operators.append(
            _operator(
                schema.BuiltinOperator.FULLY_CONNECTED,
                [layer_input, weights, bias],
                len(tensors) - 1,
                schema.BuiltinOptions.FullyConnectedOptions,
                options,
            )
        )

    tensors.append(_tensor(output_name, [batch, layers[-1][0].shape[1]], buffer=0))
    softmax_options = schema.SoftmaxOptionsT()
    softmax_options.beta = 1.0
    operators.append(
        _operator(
            schema.BuiltinOperator.SOFTMAX,
            [len(tensors) - 2],
            len(tensors) - 1,
            schema.BuiltinOptions.SoftmaxOptions,
            softmax_options,
        )
    )

    subgraph = schema.SubGraphT()
    subgraph.name = "main"
    subgraph.tensors = tensors
    subgraph.inputs = [0]
    subgraph.outputs = [len(tensors) - 1]
    subgraph.operators = operators

    signature = schema.SignatureDefT()
    signature.signatureKey = "serving_default"
    signature.subgraphIndex = 0
    signature.inputs = [_tensor_map(input_name, 0)]
    signature.outputs = [_tensor_map(output_name, len(tensors) - 1)]

    model = schema.ModelT()
    model.version = _TFLITE_SCHEMA_VERSION
    # The description keeps the writer's first home in its name: changing it would change every generated
    # model's bytes (and sizes the tests know).
    model.description = "edgefleet.modelgen MLP"
    model.operatorCodes = [_operator_code(code) for code in _OPCODES]
    model.subgraphs = [subgraph]
    model.buffers = buffers
    model.signatureDefs = [signature]

    # Sizing the builder up front avoids repeatedly doubling and copying it for big models.
    builder = flatbuffers.Builder(sum(len(buffer.data) for buffer in buffers[1:]) + FRAMING_BYTES)
    builder.Finish(model.Pack(builder), file_identifier=_FILE_IDENTIFIER)
    return bytes(builder.Output())
