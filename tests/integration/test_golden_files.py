"""Golden data and eval sets of any size, on a real server in this process spoken to over gRPC: eval sets
upload in chunks past the message limit (with clear errors for a malformed stream), golden data too large
to sign inline is a file of its own that the server serves only once the operator signed it, and only
with the signed hash."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from edgefleet import model_targets, modelinfo, signing
from edgefleet.devtools import modelgen
from edgefleet.devtools.rpc_harness import Harness, running_harness
from edgefleet.server.operator_service import MAX_SIDE_FILE_BYTES
from edgefleet.v1 import device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc

MiB = 2**20
MESSAGE_LIMIT = MiB // 4  # this server's: an eval set over it cannot ride in the header
CHUNK = 64 * 1024


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_harness(tmp_path, max_message_bytes=MESSAGE_LIMIT) as h:
        yield h


def _requests(
    model: bytes, *, eval_npz: bytes = b"", inline_eval: bytes = b"", eval_length: int | None = None
) -> Iterator[operator_pb2.UploadModelRequest]:
    header = operator_pb2.UploadModelHeader(
        name="wide",
        version="1",
        length=len(model),
        sha256=hashlib.sha256(model).hexdigest(),
        eval_npz=inline_eval,
        eval_length=len(eval_npz) if eval_length is None else eval_length,
    )
    yield operator_pb2.UploadModelRequest(header=header)
    for start in range(0, len(eval_npz), CHUNK):
        yield operator_pb2.UploadModelRequest(eval_chunk=eval_npz[start : start + CHUNK])
    for start in range(0, len(model), CHUNK):
        yield operator_pb2.UploadModelRequest(chunk=model[start : start + CHUNK])


async def _upload(harness: Harness, requests: Iterator[Any]) -> Any:
    stub = operator_pb2_grpc.OperatorServiceStub(harness.operator)
    return await stub.UploadModel(iter(list(requests)), timeout=120)


def _eval_set(model: bytes, rows: int) -> bytes:
    x = np.random.default_rng(0).uniform(0, 1, (rows, 64)).astype(np.float32)
    return modelgen.reference_eval_npz(model, {"features": x})


async def test_an_eval_set_larger_than_one_message_uploads_in_chunks(harness: Harness) -> None:
    model = modelgen.build_large_mlp(200_000, in_features=64)
    eval_npz = _eval_set(model, 1200)
    assert len(eval_npz) > MESSAGE_LIMIT
    with pytest.raises(grpc.aio.AioRpcError) as inline:
        await _upload(harness, _requests(model, inline_eval=eval_npz, eval_length=0))
    assert inline.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    reply = await _upload(harness, _requests(model, eval_npz=eval_npz))
    assert len(reply.variants) > 1
    original = json.loads(reply.variants[0].details_json)
    assert original["pushed_with"]["eval_sha256"] == hashlib.sha256(eval_npz).hexdigest()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("short", "the eval set ended at 6 of the 100 bytes the header declared"),
        ("both", "send the eval set inline or in chunks, not both"),
        ("huge", f"the limit is {MAX_SIDE_FILE_BYTES}: send fewer rows"),
    ],
)
async def test_a_malformed_eval_stream_is_refused_saying_what_is_wrong(
    harness: Harness, kind: str, message: str
) -> None:
    model = modelgen.build_large_mlp(100_000, in_features=64)
    requests = {
        "short": _requests(model, eval_npz=b"sixbyt", eval_length=100),
        "both": _requests(model, eval_npz=b"abc", inline_eval=b"abc"),
        "huge": _requests(model, eval_length=MAX_SIDE_FILE_BYTES + 1),
    }[kind]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _upload(harness, requests)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (refused.value.details() or "")


async def _publish(harness: Harness, additions: list[signing.TargetFile]) -> Any:
    stub = operator_pb2_grpc.OperatorServiceStub(harness.operator)
    signer = signing.load_signer(harness.keys.targets)
    signed = signing.sign_targets(None, additions, signer)
    return await stub.PublishTargets(operator_pb2.PublishTargetsRequest(targets_json=signed), timeout=30)


async def _download(channel: grpc.aio.Channel, path: str) -> bytes:
    stub = device_pb2_grpc.DeviceServiceStub(channel)
    data = b""
    async for chunk in stub.DownloadModel(device_pb2.DownloadModelRequest(target_path=path), timeout=30):
        data += chunk.data
    return data


async def test_a_golden_file_is_served_once_signed_and_only_with_the_signed_hash(harness: Harness) -> None:
    # 5000 float features: a 20 KB golden input, over what rides inline in signed metadata.
    model = modelgen.build_large_mlp(400_000, in_features=5000)
    header = operator_pb2.UploadModelHeader(
        name="wide", version="1", length=len(model), sha256=hashlib.sha256(model).hexdigest()
    )
    requests = [operator_pb2.UploadModelRequest(header=header)]
    requests += [
        operator_pb2.UploadModelRequest(chunk=model[i : i + CHUNK]) for i in range(0, len(model), CHUNK)
    ]
    reply = await _upload(harness, iter(requests))
    details = json.loads(reply.variants[0].details_json)
    assert "golden" not in details
    golden = model_targets.GoldenFile.from_json(details["golden_file"])
    assert golden.path == f"wide/1/golden-{golden.sha256[:16]}.npz"
    npz = bytes(reply.original_golden_npz)  # what the CLI checks against its own run before signing
    assert hashlib.sha256(npz).hexdigest() == golden.sha256
    assert modelinfo.Golden.from_npz(npz).inputs[0].shape == (1, 5000)

    device = await harness.enroll("cam")
    with pytest.raises(grpc.aio.AioRpcError) as unsigned:
        await _download(device.channel, golden.path)
    assert unsigned.value.code() == grpc.StatusCode.NOT_FOUND

    model_target = signing.TargetFile(len(model), {"sha256": reply.sha256}, reply.target_path)
    forged = signing.TargetFile(golden.length, {"sha256": hashlib.sha256(b"x").hexdigest()}, golden.path)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _publish(harness, [model_target, forged])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "signed hash or length differs" in (refused.value.details() or "")

    await _publish(
        harness, [model_target, signing.TargetFile(golden.length, {"sha256": golden.sha256}, golden.path)]
    )
    assert await _download(device.channel, golden.path) == npz
