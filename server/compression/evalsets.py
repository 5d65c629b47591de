"""Eval sets: what an operator sends with `model push --eval` (an .npz), parsed without trusting it."""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass

import numpy as np

from edgefleet.errors import InvalidRequestError

MAX_EVAL_BYTES = 64 * 2**20
EVAL_KEYS = ("x", "y", "reference")


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == is ambiguous.
class EvalSet:
    x: np.ndarray
    y: np.ndarray | None = None  # integer class labels, one per row of x
    reference: np.ndarray | None = None  # the float model's expected outputs, one per row of x


# ---- eval data ---------------------------------------------------------------------------------------


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


def load_eval_npz(data: bytes, max_bytes: int = MAX_EVAL_BYTES) -> EvalSet:
    """Parse an eval set saved with ``numpy.savez(f, x=..., y=...)`` (or ``reference=`` instead of ``y``).

    No pickles, no more than `max_bytes` compressed or decompressed. Raises InvalidRequestError that says
    what to fix.
    """
    if len(data) > max_bytes:
        raise InvalidRequestError(
            f"eval set is {len(data)} bytes, over the {max_bytes} limit: send fewer rows"
        )
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = {name.removesuffix(".npy"): name for name in zf.namelist()}
            unknown = sorted(set(members) - set(EVAL_KEYS))
            if unknown or "x" not in members:
                raise InvalidRequestError(
                    f"eval set has keys {sorted(members)}: expected x plus y (labels) or reference (outputs)"
                )
            declared = sum(info.file_size for info in zf.infolist())
            if declared > max_bytes:
                raise InvalidRequestError(f"eval set unpacks to {declared} bytes, over the {max_bytes} limit")
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

    x, y, reference = arrays["x"], arrays.get("y"), arrays.get("reference")
    if x.ndim < 2 or len(x) == 0:
        raise InvalidRequestError(f"eval set: x has shape {x.shape}; expected rows of model input, [n, ...]")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise InvalidRequestError("eval set: x contains NaN or infinity")
    if y is not None:
        if y.dtype.kind not in "iu" or y.shape != (len(x),):
            raise InvalidRequestError(
                f"eval set: y has shape {y.shape} and dtype {y.dtype}; expected {len(x)} integer labels"
            )
        if (y < 0).any():
            raise InvalidRequestError("eval set: y has negative labels; labels are class indices")
    if reference is not None:
        if len(reference) != len(x) or reference.ndim < 2:
            raise InvalidRequestError(
                f"eval set: reference has shape {reference.shape}; expected {len(x)} rows of model output"
            )
        if not np.isfinite(reference).all():
            raise InvalidRequestError("eval set: reference contains NaN or infinity")
    return EvalSet(x, y, reference)
