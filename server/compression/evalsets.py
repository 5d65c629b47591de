"""Eval sets: what an operator sends with `model push --eval` (an .npz), parsed without trusting it.

**Format.** An .npz (``numpy.savez``) of numeric arrays, rows = examples, in one of two forms:

- *single tensor*, for a model with one input and one output: ``x`` (the inputs) and optionally ``y``
  (integer class labels, one per row) or ``reference`` (the expected outputs, one row per row of x).
- *named*, for any number of inputs and outputs: one array per input, keyed by the input tensor's name
  (as ``edgefleet model inspect`` / the push reply lists them), and optionally ``reference/<output name>``
  (the expected values of that output) and ``labels/<output name>`` (integer class labels for that output,
  which is then judged by accuracy). Every input must be given, all with the same number of rows.

Rows have the model's input shape without its batch dimension (``[n, *shape[1:]]``) and a dtype that casts
to the input's (a quantized uint8/int8 input takes its raw integer values). Keys are checked against the model
in `EvalSet.bind`: a missing input, an unknown key, a wrong shape or dtype is refused with what to fix.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edgefleet.errors import InvalidRequestError

MAX_EVAL_BYTES = 64 * 2**20
SINGLE_KEYS = ("x", "y", "reference")
REFERENCE_PREFIX = "reference/"
LABELS_PREFIX = "labels/"


@dataclass(frozen=True)
class TensorInfo:
    """One model input or output as the reference runtime reports it (batch dimension first, 1 if dynamic)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float = 0.0  # quantization; 0.0 when the tensor is float
    zero_point: int = 0


@dataclass(frozen=True)
class ModelIo:
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == is ambiguous.
class EvalSet:
    """Either the single-tensor form (`x`, `y`, `reference`) or the named form (`inputs`, `labels`,
    `references`, each keyed by tensor name); `bind` turns either into the named form for one model."""

    x: np.ndarray | None = None
    y: np.ndarray | None = None  # integer class labels, one per row of x
    reference: np.ndarray | None = None  # the float model's expected outputs, one per row of x
    inputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    labels: Mapping[str, np.ndarray] = field(default_factory=dict)
    references: Mapping[str, np.ndarray] = field(default_factory=dict)

    def bind(self, io_: ModelIo, what: str = "eval set") -> BoundEvalSet:
        """The eval set keyed by this model's tensor names, checked against them. Raises
        InvalidRequestError that says what to fix."""
        input_names = [t.name for t in io_.inputs]
        output_names = [t.name for t in io_.outputs]
        if self.x is not None:
            if len(io_.inputs) != 1:
                raise InvalidRequestError(
                    f"{what} gives one x; the model has {len(io_.inputs)} inputs ({', '.join(input_names)}): "
                    "give one array per input name"
                )
            if (self.y is not None or self.reference is not None) and len(io_.outputs) != 1:
                raise InvalidRequestError(
                    f"{what} gives y/reference for one output; the model has {len(io_.outputs)} outputs "
                    f"({', '.join(output_names)}): use labels/<output name> or reference/<output name>"
                )
            inputs = {input_names[0]: self.x}
            labels = {} if self.y is None else {output_names[0]: self.y}
            references = {} if self.reference is None else {output_names[0]: self.reference}
        else:
            inputs, labels, references = dict(self.inputs), dict(self.labels), dict(self.references)
        unknown = sorted(set(inputs) - set(input_names))
        unknown += [REFERENCE_PREFIX + n for n in sorted(set(references) - set(output_names))]
        unknown += [LABELS_PREFIX + n for n in sorted(set(labels) - set(output_names))]
        if unknown:
            raise InvalidRequestError(
                f"{what} has unknown keys {unknown}: the model's inputs are {input_names}, its outputs "
                f"{output_names}"
            )
        missing = [n for n in input_names if n not in inputs]
        if missing:
            raise InvalidRequestError(f"{what} lacks the model's inputs {missing}: give one array per input")
        rows = {name: len(array) for name, array in inputs.items()}
        if len(set(rows.values())) != 1:
            raise InvalidRequestError(f"{what}: the inputs have different numbers of rows {rows}")
        n = next(iter(rows.values()))
        checked = {t.name: _check_rows(inputs[t.name], t, f"{what} input {t.name!r}") for t in io_.inputs}
        for t in io_.outputs:
            if t.name in labels:
                _check_labels(labels[t.name], t, n, what)
            if t.name in references and tuple(references[t.name].shape) != (n, *t.shape[1:]):
                raise InvalidRequestError(
                    f"{what} reference for {t.name!r} has shape {references[t.name].shape}; the model gives "
                    f"rows of {t.shape[1:]}, so expected {(n, *t.shape[1:])}"
                )
        return BoundEvalSet(checked, labels, references)


@dataclass(frozen=True, eq=False)
class BoundEvalSet:
    """An eval set checked against one model, keyed by its tensor names."""

    inputs: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    references: dict[str, np.ndarray]

    @property
    def rows(self) -> int:
        return len(next(iter(self.inputs.values())))


def _check_rows(x: np.ndarray, spec: TensorInfo, what: str) -> np.ndarray:
    if tuple(x.shape[1:]) != spec.shape[1:]:
        raise InvalidRequestError(
            f"{what} has rows of shape {tuple(x.shape[1:])}; the model's input takes {spec.shape[1:]}"
        )
    if not np.can_cast(x.dtype, spec.dtype, casting="same_kind"):
        raise InvalidRequestError(f"{what} has dtype {x.dtype}; the model's input is {spec.dtype}")
    return x.astype(spec.dtype)


def _check_labels(y: np.ndarray, spec: TensorInfo, n: int, what: str) -> None:
    classes = math.prod(spec.shape[1:])
    if y.shape != (n,):
        raise InvalidRequestError(f"{what} labels for {spec.name!r} have shape {y.shape}; expected ({n},)")
    if y.max() >= classes:
        raise InvalidRequestError(
            f"{what} has label {y.max()} for {spec.name!r}; it outputs {classes} classes"
        )


# ---- parsing the .npz --------------------------------------------------------------------------------


def _npy_shape(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a .npy header, read before numpy allocates anything for the array."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version not in readers:
            raise InvalidRequestError(
                f"eval set: {member} uses .npy format {version}; save it with numpy.savez"
            )
        shape, _, dtype = readers[version](f)
    return shape, dtype


def _read_arrays(data: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    if len(data) > max_bytes:
        raise InvalidRequestError(
            f"eval set is {len(data)} bytes, over the {max_bytes} limit: send fewer rows"
        )
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = {name.removesuffix(".npy"): name for name in zf.namelist()}
            declared = sum(info.file_size for info in zf.infolist())
            if declared > max_bytes:
                raise InvalidRequestError(f"eval set unpacks to {declared} bytes, over the {max_bytes} limit")
            if set(members) & {"y", "reference"} and "x" not in members:
                raise InvalidRequestError(
                    f"eval set has keys {sorted(members)}: expected x plus y (labels) or reference (outputs)"
                )
            if "x" in members and set(members) - set(SINGLE_KEYS):
                raise InvalidRequestError(
                    f"eval set has keys {sorted(members)}: expected x plus y (labels) or reference (outputs), "
                    "or one array per input name (with reference/<output> and labels/<output>), not both"
                )
            arrays = {}
            for key, member in members.items():
                shape, dtype = _npy_shape(zf, member)
                if dtype.hasobject or dtype.kind not in "biuf":
                    raise InvalidRequestError(f"eval set: {key} has dtype {dtype}; use numeric arrays")
                if math.prod(shape) * dtype.itemsize > zf.getinfo(member).file_size:
                    raise InvalidRequestError(f"eval set: {key}'s header claims more data than it holds")
                with zf.open(member) as f:
                    arrays[key] = np.lib.format.read_array(f, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        raise InvalidRequestError(f"eval set is not a readable .npz ({e}); save it with numpy.savez") from e
    if not arrays:
        raise InvalidRequestError("eval set is empty: expected x plus y (labels) or reference (outputs)")
    return arrays


def load_eval_npz(data: bytes, max_bytes: int = MAX_EVAL_BYTES) -> EvalSet:
    """Parse an eval set in either form of the module docstring.

    No pickles, no more than `max_bytes` compressed or decompressed. Raises InvalidRequestError that says
    what to fix; keys are checked against the model later (`EvalSet.bind`).
    """
    arrays = _read_arrays(data, max_bytes)
    if "x" in arrays:
        x, y, reference = arrays["x"], arrays.get("y"), arrays.get("reference")
        if x.ndim < 2 or len(x) == 0:
            raise InvalidRequestError(
                f"eval set: x has shape {x.shape}; expected rows of model input, [n, ...]"
            )
        _check_finite(x, "x")
        if y is not None:
            _check_label_values(y, len(x), "y")
        if reference is not None:
            if len(reference) != len(x) or reference.ndim < 2:
                raise InvalidRequestError(
                    f"eval set: reference has shape {reference.shape}; expected {len(x)} rows of model output"
                )
            _check_finite(reference, "reference", "NaN or infinity")
        return EvalSet(x, y, reference)

    inputs, labels, references = {}, {}, {}
    for key, array in arrays.items():
        if key.startswith(REFERENCE_PREFIX):
            references[key.removeprefix(REFERENCE_PREFIX)] = array
        elif key.startswith(LABELS_PREFIX):
            labels[key.removeprefix(LABELS_PREFIX)] = array
        else:
            inputs[key] = array
    if not inputs:
        raise InvalidRequestError(
            f"eval set has keys {sorted(arrays)} but no inputs: give one array per input"
        )
    n = len(next(iter(inputs.values())))
    for key, array in inputs.items():
        if array.ndim < 1 or len(array) == 0:
            raise InvalidRequestError(f"eval set: {key} has shape {array.shape}; expected rows of that input")
        _check_finite(array, key)
    for key, array in labels.items():
        _check_label_values(array, n, LABELS_PREFIX + key)
    for key, array in references.items():
        _check_finite(array, REFERENCE_PREFIX + key, "NaN or infinity")
    return EvalSet(inputs=inputs, labels=labels, references=references)


def _check_finite(array: np.ndarray, key: str, words: str = "NaN or infinity") -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidRequestError(f"eval set: {key} contains {words}")


def _check_label_values(y: np.ndarray, n: int, key: str) -> None:
    if y.dtype.kind not in "iu" or y.shape != (n,):
        raise InvalidRequestError(
            f"eval set: {key} has shape {y.shape} and dtype {y.dtype}; expected {n} integer labels"
        )
    if (y < 0).any():
        raise InvalidRequestError(f"eval set: {key} has negative labels; labels are class indices")
