"""What a .tflite file says about itself without running it: its operators and how its weights are stored.

Read from the flatbuffer with the schema ai-edge-litert ships (server and CLI have it; the agent needs none of
this). Used at push to refuse, with what they need, models no runtime here can run (TensorFlow ops through
Flex, Edge TPU-compiled graphs, unknown custom ops), and by compression to see a model that is already
quantized (it gets no quantized variants: quantizing int8 weights again only loses accuracy).

An operator's code is ``max(builtin_code, deprecated_builtin_code)``, as the schema says: files written
before schema 3a (the MediaPipe models, for one) carry only the deprecated field and read 0 (ADD) in the
other.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from edgefleet.errors import IncompatibleError, ModelError

FLEX_PREFIX = "Flex"  # SELECT_TF_OPS: TensorFlow kernels the TFLite runtimes here do not link
EDGE_TPU_OP = "edgetpu-custom-op"
# Custom ops the standard op resolvers of both runtimes register (a detector's post-processing).
KNOWN_CUSTOM_OPS = frozenset({"TFLite_Detection_PostProcess"})
QUANTIZED_WEIGHT_TYPES = frozenset({"INT8", "UINT8", "INT4", "INT16"})


def _schema() -> Any:
    from ai_edge_litert import schema_py_generated  # heavy; only where a file is inspected

    return schema_py_generated


@dataclass(frozen=True)
class FileFacts:
    """Operators by name (custom ones as ``CUSTOM:<code>``) and constant tensors counted by storage type."""

    operators: tuple[str, ...]
    custom_ops: tuple[str, ...]
    constant_types: dict[str, int]
    quantized_tensors: int  # tensors (constant or not) with quantization scales

    @property
    def already_quantized(self) -> bool:
        """Integer weights or quantized activations: the model was quantized before it was pushed."""
        return self.quantized_tensors > 0 or bool(QUANTIZED_WEIGHT_TYPES & set(self.constant_types))

    @property
    def float16_weights(self) -> bool:
        return "FLOAT16" in self.constant_types and "DEQUANTIZE" in self.operators

    def unrunnable_ops(self) -> dict[str, str]:
        """Custom ops no runtime here has, each with what it needs."""
        needs = {}
        for op in self.custom_ops:
            if op.startswith(FLEX_PREFIX):
                needs[op] = "TensorFlow's Flex delegate (SELECT_TF_OPS)"
            elif op == EDGE_TPU_OP:
                needs[op] = (
                    "an Edge TPU and its delegate (libedgetpu); push the model before edgetpu_compiler"
                )
            elif op not in KNOWN_CUSTOM_OPS:
                needs[op] = "a custom op registered in the runtime"
        return needs


def read_facts(content: bytes) -> FileFacts:
    """Raises ModelError when the bytes are not a TFLite flatbuffer."""
    schema = _schema()
    if len(content) < 8 or content[4:8] != b"TFL3":
        raise ModelError("not a TFLite model: the file lacks the TFL3 identifier")
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    try:
        model = schema.Model.GetRootAs(content, 0)
        operators, custom = [], []
        for i in range(model.OperatorCodesLength()):
            code = model.OperatorCodes(i)
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            name = names.get(builtin, str(builtin))
            if name == "CUSTOM":
                custom_code = (code.CustomCode() or b"").decode(errors="replace")
                custom.append(custom_code)
                name = f"CUSTOM:{custom_code}"
            operators.append(name)
        constants: Counter[str] = Counter()
        quantized = 0
        for s in range(model.SubgraphsLength()):
            subgraph = model.Subgraphs(s)
            for t in range(subgraph.TensorsLength()):
                tensor = subgraph.Tensors(t)
                buffer = model.Buffers(tensor.Buffer()) if tensor.Buffer() < model.BuffersLength() else None
                if buffer is not None and (not buffer.DataIsNone() or buffer.Size() > 0):
                    constants[types.get(tensor.Type(), str(tensor.Type()))] += 1
                q = tensor.Quantization()
                if q is not None and q.ScaleLength() > 0:
                    quantized += 1
    except (IndexError, ValueError, TypeError, UnicodeDecodeError) as e:  # flatbuffers' own errors
        raise ModelError(f"not a readable TFLite flatbuffer: {e}") from e
    return FileFacts(tuple(sorted(set(operators))), tuple(sorted(set(custom))), dict(constants), quantized)


def check_runnable(facts: FileFacts) -> None:
    """Raises IncompatibleError naming the ops no runtime here can run, and what each needs."""
    needs = facts.unrunnable_ops()
    if needs:
        listed = "; ".join(f"{op} needs {need}" for op, need in sorted(needs.items()))
        raise IncompatibleError(
            f"the model uses ops that ai-edge-litert and tflite-runtime cannot run here: {listed}. "
            "Convert it with TFLite builtin ops only (no SELECT_TF_OPS, no custom ops)"
        )
