"""Enroll's trust-root check on the open enrollment port: a digest that is not this fleet's root is refused
before the token is spent, and one that is not a digest at all is the caller's error, never INTERNAL (the
fuzz suite found that one)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from edgefleet import pki
from edgefleet.devtools.rpc_harness import Harness, running_harness
from edgefleet.v1 import device_pb2_grpc


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_harness(tmp_path) as h:
        yield h


@pytest.mark.parametrize(
    ("digest", "code"),
    [
        ("é" * 300, grpc.StatusCode.INVALID_ARGUMENT),
        ("0" * 64, grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
async def test_a_bad_or_foreign_trust_root_digest_is_refused_and_the_token_kept(
    harness: Harness, digest: str, code: grpc.StatusCode
) -> None:
    token = await harness.create_token(uses=1)
    request = harness.enrollment_request("cam", token, pki.new_key())
    request.trust_root_sha256 = digest
    stub = device_pb2_grpc.DeviceServiceStub(harness.channel(enroll_port=True))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Enroll(request, timeout=10)
    assert refused.value.code() == code
    request.trust_root_sha256 = hashlib.sha256(harness.keys.trust_root.read_bytes()).hexdigest()
    assert (await stub.Enroll(request, timeout=10)).device_id  # the token was not spent
