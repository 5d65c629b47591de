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


@pytest.mark.parametrize("text", ["", "every thing", "group:", "group:../x", "device:a b", "host:x"])
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


# ---- what a late joiner gets (server.rules) ---------------------------------------------------------------


def test_late_joiner_gets_what_its_selector_was_last_told_even_a_rollback() -> None:
    from edgefleet.server.rules import late_joiner_order
    from edgefleet.server.storage.records import Deployment

    deploy_v1 = Deployment("d1", "digits", "1", "group:lab", 1)
    deploy_v2 = Deployment("d2", "digits", "2", "group:lab", 2)
    back_to_v1 = Deployment("rb", "digits", "1", "group:lab", 3, kind="rollback")
    mixed = Deployment("rb2", "", "", "group:lab", 4, kind="rollback")
    elsewhere = Deployment("d3", "digits", "3", "group:other", 5)
    in_lab = lambda d: d.selector == "group:lab"  # noqa: E731
    assert late_joiner_order([deploy_v1, deploy_v2, back_to_v1, elsewhere], in_lab) is back_to_v1
    assert late_joiner_order([deploy_v1, deploy_v2], in_lab) is deploy_v2
    assert late_joiner_order([deploy_v1, deploy_v2, mixed], in_lab) is None  # never the rolled-back-from v2
    assert late_joiner_order([elsewhere], in_lab) is None


def test_rollback_destination_is_one_version_or_none() -> None:
    from edgefleet.server.rules import rollback_destination
    from edgefleet.values import ModelRef

    v1 = ModelRef("digits/1/float32.tflite", "digits", "1")
    v1_int8 = ModelRef("digits/1/int8.tflite", "digits", "1", "int8")
    v0 = ModelRef("digits/0/float32.tflite", "digits", "0")
    assert rollback_destination([v1, v1_int8]) == ("digits", "1")  # variants of one version are one version
    assert rollback_destination([v1, v0]) == ("", "")
    assert rollback_destination([]) == ("", "")
