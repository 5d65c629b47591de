"""What a model declares and how it behaves: tensor signatures and golden input/output pairs.

These travel in the signed targets metadata (custom fields), so a device can refuse a candidate whose tensors
differ from what the operator signed, or whose output on the signed golden input is wrong, before it serves.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefleet.errors import IncompatibleError, ModelError
from edgefleet.runtime import make_interpreter

# Golden tensors up to INLINE_GOLDEN_BYTES ride inside the signed JSON metadata (which every device fetches
# whole, for every version); larger ones travel as a signed target file of their own (`to_npz`). Readers
# accept inline data up to MAX_GOLDEN_BYTES: targets signed before the golden file existed carry that much.
INLINE_GOLDEN_BYTES = 16 * 1024
MAX_GOLDEN_BYTES = 256 * 1024
# A golden file comes back to the CLI inside one gRPC reply (to be checked before it is signed).
MAX_GOLDEN_NPZ_BYTES = 12 * 2**20
GOLDEN_CASES = 1  # the agent runs one invoke per golden check
QUANTIZED_STEPS = 3  # quantization steps two correct runtimes may differ by on a quantized output
GOLDEN_DTYPES = frozenset({"float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"})


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
    """Loads the model in `runtime`. Raises IncompatibleError naming the ops no runtime here has (Flex,
    Edge TPU, unknown custom ops), ModelError when it does not load otherwise."""
    return signature_of(_load(content, runtime))


def _load(content: bytes, runtime: str) -> Any:
    from edgefleet.modelfile import check_runnable, read_facts  # the flatbuffer schema: server and CLI only

    facts = read_facts(content)
    check_runnable(facts)
    try:
        return make_interpreter(runtime, model_content=content)
    except (ValueError, RuntimeError) as e:
        if facts.custom_ops:
            raise IncompatibleError(
                f"the model does not load on {runtime} ({first_line(e)}); it uses custom ops "
                f"{', '.join(facts.custom_ops)}"
            ) from e
        raise ModelError(f"not a loadable TFLite model: {first_line(e)}") from e


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def quantization_of(details: list[dict[str, Any]]) -> tuple[tuple[float, int], ...]:
    """(scale, zero point) per tensor of an interpreter's details, (0.0, 0) for a float one; per-tensor
    parameters only (inputs and outputs are never quantized per channel)."""
    return tuple((float(d["quantization"][0]), int(d["quantization"][1])) for d in details)


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


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == is ambiguous.
class Golden:
    """Signed inputs and the outputs the model must give on them, within atol + rtol * |expected|.

    Outputs of a quantized model are compared as the values they stand for, ``scale * (q - zero_point)``,
    and a few quantization steps of difference are allowed on top of atol (``QUANTIZED_STEPS``): two correct
    runtimes may round an int8 result differently. `output_quantization` holds (scale, zero point) per
    output, (0.0, 0) for an unquantized one; empty means none is quantized.

    Two forms: `to_json` (inline in signed metadata, at most ``MAX_GOLDEN_BYTES`` of tensors) and
    `to_npz` (any size, for a signed target file of its own): an .npz with ``input/<name>`` and
    ``output/<name>`` per tensor, their order in ``input_names`` / ``output_names``, ``tolerance``
    [atol, rtol] and ``output_quantization`` [[scale, zero point], ...].
    """

    inputs: tuple[np.ndarray, ...]
    outputs: tuple[np.ndarray, ...]
    atol: float = 1e-4
    rtol: float = 1e-3
    output_quantization: tuple[tuple[float, int], ...] = ()
    input_names: tuple[str, ...] = ()  # tensor names; positions when empty
    output_names: tuple[str, ...] = ()

    @property
    def size_bytes(self) -> int:
        return sum(a.nbytes for a in self.inputs + self.outputs)

    @property
    def fits_inline(self) -> bool:
        return self.size_bytes <= INLINE_GOLDEN_BYTES

    def to_json(self) -> dict[str, Any]:
        """Raises ModelError when the tensors are over MAX_GOLDEN_BYTES (use `to_npz`)."""
        if self.size_bytes > MAX_GOLDEN_BYTES:
            raise ModelError(
                f"golden tensors are {self.size_bytes} bytes; the limit inline is {MAX_GOLDEN_BYTES}"
            )
        data: dict[str, Any] = {
            "inputs": [_encode(a) for a in self.inputs],
            "outputs": [_encode(a) for a in self.outputs],
            "atol": self.atol,
            "rtol": self.rtol,
        }
        # Only when there is something to say: a float model's golden JSON stays what older agents read.
        if any(scale for scale, _ in self.output_quantization):
            data["output_quantization"] = [[float(s), int(z)] for s, z in self.output_quantization]
        if self.input_names or self.output_names:
            data["input_names"], data["output_names"] = list(self.input_names), list(self.output_names)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Golden:
        try:
            atol, rtol = _tolerances(float(data["atol"]), float(data["rtol"]))
            return cls(
                tuple(_decode(a) for a in data["inputs"]),
                tuple(_decode(a) for a in data["outputs"]),
                atol,
                rtol,
                tuple((float(s), int(z)) for s, z in data.get("output_quantization", [])),
                tuple(str(n) for n in data.get("input_names", [])),
                tuple(str(n) for n in data.get("output_names", [])),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"malformed golden data: {e}") from e

    def to_npz(self) -> bytes:
        inputs = self.input_names or tuple(str(i) for i in range(len(self.inputs)))
        outputs = self.output_names or tuple(str(i) for i in range(len(self.outputs)))
        arrays = {f"input/{n}": a for n, a in zip(inputs, self.inputs, strict=True)}
        arrays |= {f"output/{n}": a for n, a in zip(outputs, self.outputs, strict=True)}
        buffer = io.BytesIO()
        np.savez(
            buffer,
            input_names=np.array(inputs, dtype=str),
            output_names=np.array(outputs, dtype=str),
            tolerance=np.array([self.atol, self.rtol], np.float64),
            output_quantization=np.array(self.output_quantization, np.float64).reshape(-1, 2),
            **arrays,
        )
        return buffer.getvalue()

    @classmethod
    def from_npz(cls, data: bytes, max_bytes: int = MAX_GOLDEN_NPZ_BYTES) -> Golden:
        """Raises ModelError for anything but what `to_npz` writes (no pickles, at most `max_bytes`)."""
        if len(data) > max_bytes:
            raise ModelError(f"golden data is {len(data)} bytes, over the {max_bytes} limit")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                if sum(info.file_size for info in npz.zip.infolist()) > max_bytes:
                    raise ValueError(f"it unpacks to more than {max_bytes} bytes")
                input_names = tuple(str(n) for n in npz["input_names"])
                output_names = tuple(str(n) for n in npz["output_names"])
                expected = {"input_names", "output_names", "tolerance", "output_quantization"}
                expected |= {f"input/{n}" for n in input_names} | {f"output/{n}" for n in output_names}
                if set(npz.files) != expected:
                    raise ValueError(f"unexpected keys {sorted(set(npz.files) ^ expected)}")
                atol, rtol = _tolerances(*(float(t) for t in npz["tolerance"]))
                quantization = tuple((float(s), int(z)) for s, z in npz["output_quantization"])
                golden = cls(
                    tuple(_checked(npz[f"input/{n}"]) for n in input_names),
                    tuple(_checked(npz[f"output/{n}"]) for n in output_names),
                    atol,
                    rtol,
                    quantization,
                    input_names,
                    output_names,
                )
        except (KeyError, TypeError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ModelError(f"malformed golden data: {e}") from e
        if quantization and len(quantization) != len(golden.outputs):
            raise ModelError("malformed golden data: one (scale, zero point) per output expected")
        return golden

    def check(self, outputs: list[np.ndarray]) -> None:
        """Raises ModelError naming the worst deviation when `outputs` are not the golden ones."""
        if len(outputs) != len(self.outputs):
            raise ModelError(f"model gave {len(outputs)} outputs, golden has {len(self.outputs)}")
        for i, (got, want) in enumerate(zip(outputs, self.outputs, strict=True)):
            name = f"output {i}" + (f" ({self.output_names[i]})" if i < len(self.output_names) else "")
            if got.shape != want.shape:
                raise ModelError(f"{name} has shape {got.shape}, golden {want.shape}")
            got64, want64 = got.astype(np.float64), want.astype(np.float64)
            atol = self.atol
            scale, zero_point = self.output_quantization[i] if self.output_quantization else (0.0, 0)
            if scale:
                got64, want64 = scale * (got64 - zero_point), scale * (want64 - zero_point)
                atol += QUANTIZED_STEPS * scale
            if not np.all(np.isfinite(got64)):
                raise ModelError(f"{name} is not finite on the golden input")
            err = np.abs(got64 - want64)
            if np.any(err > atol + self.rtol * np.abs(want64)):
                raise ModelError(
                    f"{name} differs from golden by up to {float(err.max()):.3g} (atol {atol:.3g})"
                )


def _tolerances(atol: float, rtol: float) -> tuple[float, float]:
    if not (0 <= atol < 1e6 and 0 <= rtol < 1e6):
        raise ValueError("tolerance out of range")
    return atol, rtol


def _checked(array: np.ndarray) -> np.ndarray:
    if array.dtype.name not in GOLDEN_DTYPES:
        raise ValueError(f"golden tensor of dtype {array.dtype}")
    return array


def make_golden(
    content: bytes,
    runtime: str,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    inputs: list[np.ndarray] | None = None,
) -> tuple[ModelSignature, Golden]:
    """Inspects the model and records its outputs on `inputs` (what the operator gave: an eval set's first
    row), else on deterministic inputs of its own shapes and dtypes (a dynamic batch dimension runs as 1).
    Raises ModelError / IncompatibleError."""
    interpreter = _load(content, runtime)
    signature = signature_of(interpreter)
    if inputs is None:
        inputs = make_golden_inputs(signature, hashlib.sha256(content).digest())
    else:
        _check_golden_inputs(signature, inputs)
    outputs = run(interpreter, inputs)
    for spec, o in zip(signature.outputs, outputs, strict=True):
        if o.dtype.kind == "f" and not np.all(np.isfinite(o)):
            raise ModelError(f"model gives non-finite output {spec.name!r} on the golden input")
    quantization = quantization_of(interpreter.get_output_details())
    golden = Golden(
        tuple(inputs),
        tuple(outputs),
        atol,
        rtol,
        quantization if any(scale for scale, _ in quantization) else (),
        tuple(t.name for t in signature.inputs),
        tuple(t.name for t in signature.outputs),
    )
    return signature, golden


def _check_golden_inputs(signature: ModelSignature, inputs: list[np.ndarray]) -> None:
    if len(inputs) != len(signature.inputs):
        raise ModelError(f"golden input has {len(inputs)} tensors; the model takes {len(signature.inputs)}")
    for spec, x in zip(signature.inputs, inputs, strict=True):
        shape = tuple(1 if d < 0 else d for d in spec.shape)  # a dynamic batch runs as 1
        if x.dtype.name != spec.dtype or x.shape != shape:
            raise ModelError(
                f"golden input {spec.name!r} is {x.dtype.name}{list(x.shape)}; the model takes "
                f"{spec.dtype}{list(shape)}"
            )


@dataclass(frozen=True, eq=False)
class FileDescription:
    """What the operator signs about one model file besides its hash (see `describe_model_file`)."""

    signature: ModelSignature
    golden: Golden
    runtimes_ok: list[str] = field(default_factory=list)  # runtimes that reproduce the golden outputs
    runtimes_failed: dict[str, str] = field(default_factory=dict)
    original: bool = True  # the pushed file itself, not a variant made of it

    @functools.cached_property
    def golden_npz(self) -> bytes:
        """The golden file's bytes (b"" when the golden data fits inline); made once, since an .npz records
        when it was written. Raises ModelError when it is over MAX_GOLDEN_NPZ_BYTES."""
        if self.golden.fits_inline:
            return b""
        npz = self.golden.to_npz()
        if len(npz) > MAX_GOLDEN_NPZ_BYTES:
            raise ModelError(
                f"the golden input and output are {len(npz)} bytes, over the {MAX_GOLDEN_NPZ_BYTES}-byte "
                "limit of a golden file"
            )
        return npz

    def to_details(self) -> dict[str, Any]:
        """The details dict the server stores: golden data inline when it fits; otherwise the size and
        sha256 of `golden_npz`, which travels as a file of its own."""
        details: dict[str, Any] = {"signature": self.signature.to_json()}
        if self.golden.fits_inline:
            details["golden"] = self.golden.to_json()
        else:
            details["golden_npz_bytes"] = len(self.golden_npz)
            details["golden_npz_sha256"] = hashlib.sha256(self.golden_npz).hexdigest()
        if self.original:
            # Without an eval set the only check is "same output as the reference runtime on the golden input".
            details["runtimes_ok"] = self.runtimes_ok
            details["runtimes_failed"] = self.runtimes_failed
        return details


def describe_model_file(
    content: bytes, original: bytes | None, golden_inputs: list[np.ndarray] | None = None
) -> FileDescription:
    """Golden data computed on the reference runtime (on `golden_inputs`, else generated ones), and which
    installed runtimes reproduce it. `original` is the model a variant came from (None for the pushed file).
    Raises ModelError / IncompatibleError."""
    from edgefleet.runtime import LITERT, available_runtimes

    # A variant's golden output is its own on the reference runtime; other correct runtimes differ from it
    # by rounding in quantized kernels, far less than a wrong kernel does (that gives another class).
    signature, golden = make_golden(
        content, LITERT, atol=1e-4 if original is None else 2e-2, inputs=golden_inputs
    )
    reproduced, failed = [], {}
    for runtime in available_runtimes():
        try:
            golden.check(run(make_interpreter(runtime, model_content=content), list(golden.inputs)))
            reproduced.append(runtime)
        except (ModelError, ValueError, RuntimeError) as e:
            failed[runtime] = str(e)[:300]
    return FileDescription(signature, golden, reproduced, failed, original is None)


def describe_file(content: bytes, original: bytes | None) -> dict[str, Any]:
    """`describe_model_file(...).to_details()`: the details dict the server stores for one file."""
    return describe_model_file(content, original).to_details()
