"""numpy arrays <-> `edgefleet.v1.Tensor`, with the checks a service needs before trusting a peer's bytes."""

from __future__ import annotations

import math

import numpy as np

from edgefleet.errors import InvalidRequestError
from edgefleet.v1 import common_pb2

ALLOWED_DTYPES = frozenset({"float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"})
MAX_TENSOR_BYTES = 64 * 2**20


def to_proto(name: str, array: np.ndarray) -> common_pb2.Tensor:
    array = np.ascontiguousarray(array)
    return common_pb2.Tensor(
        name=name,
        dtype=array.dtype.name,
        shape=list(array.shape),
        data=array.astype(array.dtype.newbyteorder("<")).tobytes(),
    )


def from_proto(tensor: common_pb2.Tensor) -> np.ndarray:
    """Raises InvalidRequestError when dtype, shape and data disagree."""
    if tensor.dtype not in ALLOWED_DTYPES:
        raise InvalidRequestError(f"tensor {tensor.name!r}: unsupported dtype {tensor.dtype!r}")
    shape = list(tensor.shape)
    if any(d < 0 for d in shape) or len(shape) > 8:
        raise InvalidRequestError(f"tensor {tensor.name!r}: bad shape {shape}")
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if expected > MAX_TENSOR_BYTES or expected != len(tensor.data):
        raise InvalidRequestError(
            f"tensor {tensor.name!r}: {len(tensor.data)} bytes of data for shape {shape} {tensor.dtype}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).astype(dtype.newbyteorder("=")).reshape(shape)
