"""What a model declares and how it behaves: tensor signatures and golden input/output pairs.

These travel in the signed targets metadata (custom fields), so a device can refuse a candidate whose tensors
differ from what the operator signed, or whose output on the signed golden input is wrong, before it serves.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.errors import ModelError
from edgefleet.runtime import make_interpreter

# Golden tensors ride inside signed JSON metadata; keep them small.
MAX_GOLDEN_BYTES = 256 * 1024


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        try:
            return cls(str(data["name"]), str(data["dtype"]), tuple(int(d) for d in data["shape"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"malformed tensor spec {data!r}") from e


@dataclass(frozen=True)
class ModelSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSignature:
        try:
            return cls(
                tuple(TensorSpec.from_json(t) for t in data["inputs"]),
                tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            )
        except (KeyError, TypeError) as e:
            raise ModelError("malformed model signature") from e


def signature_of(interpreter: Any) -> ModelSignature:
    def spec(d: dict[str, Any]) -> TensorSpec:
        return TensorSpec(d["name"], np.dtype(d["dtype"]).name, tuple(int(x) for x in d["shape"]))

    return ModelSignature(
        tuple(spec(d) for d in interpreter.get_input_details()),
        tuple(spec(d) for d in interpreter.get_output_details()),
    )


def check_signature(actual: ModelSignature, declared: ModelSignature) -> None:
    """Raises ModelError when the model's tensors differ from the declared (signed) ones."""
    if actual != declared:
        raise ModelError(
            f"tensor signature mismatch: model has {actual.to_json()}, metadata declares {declared.to_json()}"
        )


def run(interpreter: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
    details = interpreter.get_input_details()
    if len(inputs) != len(details):
        raise ModelError(f"model takes {len(details)} inputs, got {len(inputs)}")
    for d, x in zip(details, inputs, strict=True):
        interpreter.set_tensor(d["index"], x)
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]).copy() for d in interpreter.get_output_details()]


def inspect_model(content: bytes, runtime: str) -> ModelSignature:
    """Loads the model in `runtime`. Raises ModelError when it does not load."""
    try:
        return signature_of(make_interpreter(runtime, model_content=content))
    except (ValueError, RuntimeError) as e:
        raise ModelError(f"not a loadable TFLite model: {e}") from e


def make_golden_inputs(signature: ModelSignature, seed: bytes) -> list[np.ndarray]:
    """Deterministic inputs of the right shape and dtype, seeded by (e.g.) the model's hash."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed).digest()[:8], "little"))
    arrays = []
    for spec in signature.inputs:
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            arrays.append(rng.random(spec.shape).astype(dtype))
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            arrays.append(rng.integers(info.min, info.max, size=spec.shape, dtype=dtype, endpoint=True))
        else:
            arrays.append(rng.integers(0, 2, size=spec.shape).astype(dtype))
    return arrays


def _encode(array: np.ndarray) -> dict[str, Any]:
    le = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"))
    return {
        "dtype": array.dtype.name,
        "shape": list(array.shape),
        "data": base64.b64encode(le.tobytes()).decode(),
    }


def _decode(data: dict[str, Any]) -> np.ndarray:
    try:
        raw = base64.b64decode(data["data"], validate=True)
        dtype = np.dtype(str(data["dtype"])).newbyteorder("<")
        shape = [int(d) for d in data["shape"]]
        if len(raw) > MAX_GOLDEN_BYTES or int(np.prod(shape)) * dtype.itemsize != len(raw):
            raise ValueError("size does not match shape")
        return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("=")).reshape(shape)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"malformed golden tensor: {e}") from e


@dataclass(frozen=True)
class Golden:
    """A signed input and the output the model must give on it, within atol + rtol * |expected|."""

    inputs: tuple[np.ndarray, ...]
    outputs: tuple[np.ndarray, ...]
    atol: float = 1e-4
    rtol: float = 1e-3

    def to_json(self) -> dict[str, Any]:
        size = sum(a.nbytes for a in self.inputs + self.outputs)
        if size > MAX_GOLDEN_BYTES:
            raise ModelError(f"golden tensors are {size} bytes; the limit is {MAX_GOLDEN_BYTES}")
        return {
            "inputs": [_encode(a) for a in self.inputs],
            "outputs": [_encode(a) for a in self.outputs],
            "atol": self.atol,
            "rtol": self.rtol,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Golden:
        try:
            atol, rtol = float(data["atol"]), float(data["rtol"])
            if not (0 <= atol < 1e6 and 0 <= rtol < 1e6):
                raise ValueError("tolerance out of range")
            return cls(
                tuple(_decode(a) for a in data["inputs"]),
                tuple(_decode(a) for a in data["outputs"]),
                atol,
                rtol,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"malformed golden data: {e}") from e

    def check(self, outputs: list[np.ndarray]) -> None:
        """Raises ModelError naming the worst deviation when `outputs` are not the golden ones."""
        if len(outputs) != len(self.outputs):
            raise ModelError(f"model gave {len(outputs)} outputs, golden has {len(self.outputs)}")
        for i, (got, want) in enumerate(zip(outputs, self.outputs, strict=True)):
            if got.shape != want.shape:
                raise ModelError(f"output {i} has shape {got.shape}, golden {want.shape}")
            got64, want64 = got.astype(np.float64), want.astype(np.float64)
            if not np.all(np.isfinite(got64)):
                raise ModelError(f"output {i} is not finite on the golden input")
            err = np.abs(got64 - want64)
            if np.any(err > self.atol + self.rtol * np.abs(want64)):
                raise ModelError(
                    f"output {i} differs from golden by up to {float(err.max()):.3g} (atol {self.atol})"
                )


def make_golden(
    content: bytes, runtime: str, atol: float = 1e-4, rtol: float = 1e-3
) -> tuple[ModelSignature, Golden]:
    """Inspects the model and records its output on deterministic inputs. Raises ModelError."""
    try:
        interpreter = make_interpreter(runtime, model_content=content)
    except (ValueError, RuntimeError) as e:
        raise ModelError(f"not a loadable TFLite model: {e}") from e
    signature = signature_of(interpreter)
    inputs = make_golden_inputs(signature, hashlib.sha256(content).digest())
    outputs = run(interpreter, inputs)
    for o in outputs:
        if o.dtype.kind == "f" and not np.all(np.isfinite(o)):
            raise ModelError("model gives non-finite output on the golden input")
    return signature, Golden(tuple(inputs), tuple(outputs), atol, rtol)


def describe_file(content: bytes, original: bytes | None) -> dict[str, Any]:
    """What the operator signs about one model file besides its hash: golden data computed on the reference
    runtime, and which installed runtimes reproduce it. `original` is the float model a variant came from."""
    from edgefleet.runtime import LITERT, available_runtimes

    # A variant's golden output is its own on the reference runtime; other correct runtimes differ from it
    # by rounding in quantized kernels, far less than a wrong kernel does (that gives another class).
    signature, golden = make_golden(content, LITERT, atol=1e-4 if original is None else 2e-2)
    reproduced, failed = [], {}
    for runtime in available_runtimes():
        try:
            golden.check(run(make_interpreter(runtime, model_content=content), list(golden.inputs)))
            reproduced.append(runtime)
        except (ModelError, ValueError, RuntimeError) as e:
            failed[runtime] = str(e)[:300]
    details: dict[str, Any] = {"golden": golden.to_json(), "signature": signature.to_json()}
    if original is None:
        # Without an eval set the only check is "same output as the reference runtime on the golden input".
        details["runtimes_ok"] = reproduced
        details["runtimes_failed"] = failed
    return details
