"""The float model as ai-edge-quantizer and pruning need it: a rewritten copy, never what a device gets.

Two things real models do that make the quantizer silently quantize nothing (same bytes, 1.0x):

- **Old operator codes.** Files written before schema 3a carry the op in ``deprecated_builtin_code`` only;
  the quantizer reads ``builtin_code`` (0, ADD) and skips every op. We set it to the real code.
- **float16 weights.** Converters that "quantize to float16" store weights as FLOAT16 constants feeding a
  DEQUANTIZE op; the convolutions then take a computed tensor, not a weight, and nothing is quantized or
  pruned. We fold each such DEQUANTIZE into a float32 constant (the values float16 holds, exactly).

Variants are judged against the pushed model's outputs, so the rewrite can only cost a variant, never the
pushed model.
"""

from __future__ import annotations

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema


def normalize(model: bytes) -> bytes:
    """`model` with real operator codes and float16 weights folded to float32; the same bytes when nothing
    needed a change."""
    root = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    changed = False
    for code in root.operatorCodes or []:
        real = max(code.builtinCode, code.deprecatedBuiltinCode)
        if code.builtinCode != real:
            code.builtinCode, changed = real, True
    for subgraph in root.subgraphs or []:
        kept = []
        for op in subgraph.operators or []:
            if _fold_float16_dequantize(root, subgraph, op):
                changed = True
            else:
                kept.append(op)
        subgraph.operators = kept
    if not changed:
        return model
    builder = flatbuffers.Builder(2 * len(model))
    builder.Finish(root.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _fold_float16_dequantize(root: schema.ModelT, subgraph: schema.SubGraphT, op: schema.OperatorT) -> bool:
    """Turn DEQUANTIZE(float16 constant) into a float32 constant; False when `op` is anything else."""
    code = root.operatorCodes[op.opcodeIndex]
    if code.builtinCode != schema.BuiltinOperator.DEQUANTIZE or len(op.inputs) != 1:
        return False
    source, target = subgraph.tensors[op.inputs[0]], subgraph.tensors[op.outputs[0]]
    buffer = root.buffers[source.buffer]
    if source.type != schema.TensorType.FLOAT16 or buffer.data is None or len(buffer.data) == 0:
        return False
    if target.type != schema.TensorType.FLOAT32 or op.outputs[0] in list(
        subgraph.outputs if subgraph.outputs is not None else []
    ):
        return False
    values = np.frombuffer(bytes(buffer.data), "<f2").astype("<f4")
    # The float32 data takes over the float16 buffer; the float16 tensor is left unused, without data.
    buffer.data = np.frombuffer(values.tobytes(), np.uint8)
    target.buffer, source.buffer = source.buffer, 0
    return True
