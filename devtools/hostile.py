"""Hostile ``.tflite`` models: structurally valid flatbuffers that attack the interpreter running them.

They exist to test the device agent's sandbox (`edgefleet.agent.serving.ModelWorker``): every model loads
through the ordinary ``Interpreter(model_path=...)`` path, with a float32 ``[1, 4]`` input ``x`` and a float32
``[1, 4]`` output ``y`` in a ``serving_default`` signature, so nothing short of running it reveals the attack.

What each model does, observed with ai-edge-litert 2.3.0 and tflite-runtime 2.14.0 on Linux x86_64:

=========================  =========================================  =========================================
model                      ai-edge-litert 2.3.0                       tflite-runtime 2.14.0
=========================  =========================================  =========================================
build_hanging_model        loads, allocates; ``invoke()`` busy-loops  same
                           forever on one thread
build_crashing_model       SIGSEGV in ``allocate_tensors()``           same
                           (stack overflow, ~0.2 s, 8 MiB stack)
build_memory_hog_model(n)  allocate_tensors reserves ~n bytes; under   same; under the limit it raises
                           RLIMIT_AS < n it raises ``RuntimeError``    ``MemoryError: std::bad_alloc``
                           with an empty message
=========================  =========================================  =========================================

Other attacks tried while writing this module (each in a throwaway child process):

* Crash on ai-edge-litert only: an op whose required input is ``-1`` (the "optional tensor" marker), e.g.
  ``ADD(x, -1)`` or ``FULLY_CONNECTED(x, -1, -1)``: SIGSEGV in ``allocate_tensors``, in the XNNPACK
  delegate's ``Subgraph::VisitNode``; tflite-runtime refuses it ("Node number 0 (ADD) failed to prepare").
* Crash on both, at ``invoke()``: two subgraphs whose CALL_ONCE ops initialise each other (SIGSEGV, stack
  overflow).  A CALL_ONCE that initialises its own subgraph is refused by ai-edge-litert but crashes
  tflite-runtime.
* Refused cleanly by both (ValueError at load or RuntimeError at allocate/invoke): a constant whose buffer is
  shorter than its shape, tensor indices out of range (positive or negative), out-of-range buffer or opcode
  indices, huge or negative dims, an unknown op version, GATHER / GATHER_ND / SCATTER_ND /
  EMBEDDING_LOOKUP with out-of-range constant indices, RESHAPE to a huge shape, out-of-range axes in
  CONCATENATION / MEAN / SPLIT / TRANSPOSE, ONE_HOT with a negative depth, WHILE naming missing subgraphs.
* Harmless: STRIDED_SLICE with huge begin/end/strides (clamped), an int8 FULLY_CONNECTED weight without
  quantization parameters (computes zeros).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

INPUT_NAME = "x"
OUTPUT_NAME = "y"
SHAPE = (1, 4)
"""The shape of every hostile model's single float32 input and output."""

_TFLITE_SCHEMA_VERSION = 3
_FILE_IDENTIFIER = b"TFL3"
_BUFFER_ALIGNMENT = 16  # the schema's force_align on Buffer.data
_MAX_DIM = 2**31 - 1  # tensor dims are int32


class _AlignedBufferT(schema.BufferT):
    """A BufferT honouring the schema's ``force_align: 16`` (the Python flatbuffers library ignores it)."""

    def Pack(self, builder: flatbuffers.Builder) -> int:
        if self.data is not None:
            builder.Prep(_BUFFER_ALIGNMENT, len(self.data))
        return super().Pack(builder)


class _Subgraph:
    def __init__(self, model: _Model, name: str):
        self._model = model
        self.t = schema.SubGraphT()
        self.t.name = name
        self.t.tensors = []
        self.t.operators = []
        self.t.inputs = []
        self.t.outputs = []

    def tensor(
        self,
        name: str,
        shape: Sequence[int],
        dtype: int = schema.TensorType.FLOAT32,
        value: np.ndarray | None = None,
    ) -> int:
        """Adds a tensor (a constant when ``value`` is given) and returns its index."""
        tensor = schema.TensorT()
        tensor.name = name
        tensor.shape = list(shape)
        tensor.type = dtype
        tensor.buffer = 0  # the empty sentinel: not a constant
        if value is not None:
            tensor.buffer = self._model.buffer(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
        self.t.tensors.append(tensor)
        return len(self.t.tensors) - 1

    def op(
        self,
        code: int,
        inputs: Sequence[int],
        outputs: Sequence[int],
        options_type: int = schema.BuiltinOptions.NONE,
        options: Any = None,
        version: int = 1,
    ) -> None:
        operator = schema.OperatorT()
        operator.opcodeIndex = self._model.opcode(code, version)
        operator.inputs = list(inputs)
        operator.outputs = list(outputs)
        operator.builtinOptionsType = options_type
        operator.builtinOptions = options
        self.t.operators.append(operator)

    def while_loop(self, inputs: Sequence[int], outputs: Sequence[int], cond: int, body: int) -> None:
        options = schema.WhileOptionsT()
        options.condSubgraphIndex = cond
        options.bodySubgraphIndex = body
        self.op(schema.BuiltinOperator.WHILE, inputs, outputs, schema.BuiltinOptions.WhileOptions, options)

    def io(self, inputs: Sequence[int], outputs: Sequence[int]) -> None:
        self.t.inputs = list(inputs)
        self.t.outputs = list(outputs)


class _Model:
    """A minimal builder over the schema's object API: subgraph 0 is the main one, with a signature."""

    def __init__(self, description: str):
        self._description = description
        self._buffers: list[schema.BufferT] = [schema.BufferT()]  # buffer 0: the empty sentinel
        self._opcodes: list[tuple[int, int]] = []
        self._subgraphs: list[_Subgraph] = []

    def subgraph(self, name: str) -> _Subgraph:
        graph = _Subgraph(self, name)
        self._subgraphs.append(graph)
        return graph

    def buffer(self, data: np.ndarray) -> int:
        buffer = _AlignedBufferT()
        buffer.data = data
        self._buffers.append(buffer)
        return len(self._buffers) - 1

    def opcode(self, code: int, version: int) -> int:
        if (code, version) not in self._opcodes:
            self._opcodes.append((code, version))
        return self._opcodes.index((code, version))

    def finish(self) -> bytes:
        op_codes = []
        for code, version in self._opcodes:
            op_code = schema.OperatorCodeT()
            op_code.builtinCode = code
            op_code.deprecatedBuiltinCode = min(code, 127)  # 127: PLACEHOLDER_FOR_GREATER_OP_CODES
            op_code.version = version
            op_codes.append(op_code)

        main = self._subgraphs[0].t
        signature = schema.SignatureDefT()
        signature.signatureKey = "serving_default"
        signature.subgraphIndex = 0
        signature.inputs = [_tensor_map(main, i) for i in main.inputs]
        signature.outputs = [_tensor_map(main, i) for i in main.outputs]

        model = schema.ModelT()
        model.version = _TFLITE_SCHEMA_VERSION
        model.description = self._description
        model.operatorCodes = op_codes
        model.subgraphs = [graph.t for graph in self._subgraphs]
        model.buffers = self._buffers
        model.signatureDefs = [signature]
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=_FILE_IDENTIFIER)
        return bytes(builder.Output())


def _tensor_map(graph: schema.SubGraphT, index: int) -> schema.TensorMapT:
    tensor_map = schema.TensorMapT()
    tensor_map.name = graph.tensors[index].name
    tensor_map.tensorIndex = index
    return tensor_map


def _always_true_cond(model: _Model) -> None:
    """Adds a WHILE condition subgraph taking one [1, 4] float32 and returning a constant true."""
    cond = model.subgraph("cond")
    cond.io(
        [cond.tensor("cond_x", SHAPE)],
        [cond.tensor("always_true", [], schema.TensorType.BOOL, np.array([True]))],
    )


def build_hanging_model() -> bytes:
    """A model whose ``invoke()`` never returns: ``y = while (true) { x = x + 0 }``.

    Subgraph 0 runs a WHILE over ``x``; its condition (subgraph 1) returns a constant true scalar and its body
    (subgraph 2) adds a constant zero.  Loading and ``allocate_tensors()`` are quick and succeed; ``invoke()``
    busy-loops on one CPU until the process is killed, on both ai-edge-litert 2.3.0 and tflite-runtime 2.14.0.
    Both release the GIL during ``invoke()``, so other threads of the process keep running, but neither
    Python API can cancel the call: only killing the process stops it.
    """
    model = _Model("edgefleet.hostile: invoke never returns")
    main = model.subgraph("main")
    x = main.tensor(INPUT_NAME, SHAPE)
    y = main.tensor(OUTPUT_NAME, SHAPE)
    main.while_loop([x], [y], cond=1, body=2)
    main.io([x], [y])

    _always_true_cond(model)

    body = model.subgraph("body")
    body_x = body.tensor("body_x", SHAPE)
    zero = body.tensor("zero", SHAPE, value=np.zeros(SHAPE, "<f4"))
    body_y = body.tensor("body_y", SHAPE)
    body.op(
        schema.BuiltinOperator.ADD,
        [body_x, zero],
        [body_y],
        schema.BuiltinOptions.AddOptions,
        schema.AddOptionsT(),
    )
    body.io([body_x], [body_y])
    return model.finish()


def build_crashing_model() -> bytes:
    """A model that kills the process in ``allocate_tensors()`` with SIGSEGV, on both runtimes.

    Subgraph 0 runs a WHILE whose body (subgraph 2) is itself a WHILE with the same body: a loop nested in
    itself.  Preparing a WHILE allocates its body subgraph, which prepares the body's WHILE, which allocates
    the same body again (``Subgraph::AllocateTensors -> while_kernel::Prepare -> Subgraph::AllocateTensors``
    ...): neither runtime checks for re-entry, so the recursion runs until the thread's stack overflows.

    Observed on Linux x86_64 with the default 8 MiB stack, in both ai-edge-litert 2.3.0 and tflite-runtime
    2.14.0: ``Interpreter(...)`` succeeds, then ``allocate_tensors()`` dies of SIGSEGV (exit code -11) within
    ~0.2 s and ~50 MB of RSS; never a Python exception.  The time and memory grow with the stack limit:
    under ``ulimit -s unlimited`` the stack grows until RLIMIT_AS (or the machine's memory) runs out, then
    SIGSEGV (about 18 s to eat 4 GB).  Had a runtime guarded ``Prepare``, ``invoke()`` would recurse the same
    way, since the condition is always true.
    """
    model = _Model("edgefleet.hostile: a WHILE nested in itself")
    main = model.subgraph("main")
    x = main.tensor(INPUT_NAME, SHAPE)
    y = main.tensor(OUTPUT_NAME, SHAPE)
    main.while_loop([x], [y], cond=1, body=2)
    main.io([x], [y])

    _always_true_cond(model)

    body = model.subgraph("body")
    body_x = body.tensor("body_x", SHAPE)
    body_y = body.tensor("body_y", SHAPE)
    body.while_loop([body_x], [body_y], cond=1, body=2)  # the body runs itself
    body.io([body_x], [body_y])
    return model.finish()


def build_memory_hog_model(target_bytes: int) -> bytes:
    """A model of under 1 KB whose ``allocate_tensors()`` needs about ``target_bytes`` more memory.

    ``y = sum(broadcast_to(x, [n, 4]), axis=0, keepdims=True)`` with ``n = ceil(target_bytes / 16)``: the
    float32 ``[n, 4]`` intermediate lives in the tensor arena, which ``allocate_tensors()`` reserves in full.
    With RLIMIT_AS below that, loading fails with ``RuntimeError`` (empty message, ai-edge-litert 2.3.0) or
    ``MemoryError: std::bad_alloc`` (tflite-runtime 2.14.0); without a limit it loads (VmPeak ~1.2 GB for
    1 GiB), and ``invoke()`` then writes the whole intermediate (1.5-5 s per GiB).  Raises ValueError when
    ``n`` does not fit a tensor dimension (``target_bytes`` above ~32 GiB) or is below 1.
    """
    rows = -(-target_bytes // (4 * SHAPE[1]))
    if not 1 <= rows <= _MAX_DIM:
        raise ValueError(f"target_bytes={target_bytes} must be between 1 and {_MAX_DIM * 16}")
    model = _Model(f"edgefleet.hostile: allocate_tensors needs {rows * 16} bytes")
    main = model.subgraph("main")
    x = main.tensor(INPUT_NAME, SHAPE)
    big_shape = main.tensor("big_shape", [2], schema.TensorType.INT32, np.array([rows, SHAPE[1]], "<i4"))
    big = main.tensor("big", [rows, SHAPE[1]])
    axis = main.tensor("axis", [1], schema.TensorType.INT32, np.array([0], "<i4"))
    y = main.tensor(OUTPUT_NAME, SHAPE)
    # BROADCAST_TO's kernel is registered from version 2 on.
    main.op(schema.BuiltinOperator.BROADCAST_TO, [x, big_shape], [big], version=2)
    reducer = schema.ReducerOptionsT()
    reducer.keepDims = True
    main.op(schema.BuiltinOperator.SUM, [big, axis], [y], schema.BuiltinOptions.ReducerOptions, reducer)
    main.io([x], [y])
    return model.finish()
