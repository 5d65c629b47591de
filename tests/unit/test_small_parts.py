"""Selectors, tensor conversion and durable writes: the small shared pieces every RPC relies on."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.durable import write_atomic
from edgefleet.errors import InvalidRequestError
from edgefleet.selectors import check_name, parse_selector
from edgefleet.tensors import from_proto, to_proto
from edgefleet.v1 import common_pb2


@pytest.mark.parametrize("text", ["all", "group:lab", "device:dev-12ab"])
def test_selectors_parse(text: str) -> None:
    assert str(parse_selector(text)) == text


@pytest.mark.parametrize("text", ["", "everything", "group:", "group:../x", "device:a b", "host:x"])
def test_bad_selectors_say_what_to_use(text: str) -> None:
    with pytest.raises(InvalidRequestError, match="use 'all'"):
        parse_selector(text)


@pytest.mark.parametrize("name", ["", "../etc", "a/b", "x" * 200, "-lead"])
def test_names_that_are_unsafe_in_paths_are_refused(name: str) -> None:
    with pytest.raises(InvalidRequestError):
        check_name("model name", name)


@pytest.mark.parametrize("array", [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, -2], np.int8)])
def test_tensors_round_trip(array: np.ndarray) -> None:
    back = from_proto(to_proto("x", array))
    assert back.dtype == array.dtype and np.array_equal(back, array)


@pytest.mark.parametrize(
    "tensor",
    [
        common_pb2.Tensor(name="x", dtype="float32", shape=[2], data=b"\0" * 4),  # too little data
        common_pb2.Tensor(name="x", dtype="object", shape=[1], data=b"\0" * 8),  # not a numeric dtype
        common_pb2.Tensor(name="x", dtype="float32", shape=[-1], data=b""),  # negative dimension
        common_pb2.Tensor(name="x", dtype="float32", shape=[2**40], data=b""),  # absurd size
    ],
)
def test_malformed_tensors_are_refused(tensor: common_pb2.Tensor) -> None:
    with pytest.raises(InvalidRequestError):
        from_proto(tensor)


def test_write_atomic_replaces_whole_files_only(tmp_path) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, b"old")

    def chunks():
        yield b"new"
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(path, chunks())
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
