"""Device certificates are renewed over the authenticated channel before they expire, on the server's terms:
a new key from the device (a CSR), the same device id, only when due, never for a revoked device.

An in-process server; every call comes over a real mutual-TLS channel with the certificate under test.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from edgefleet import pki
from edgefleet.devtools.rpc_harness import Harness, credential_for, running_harness
from edgefleet.v1 import device_pb2, device_pb2_grpc, operator_pb2

DAY_MS = 86_400_000


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_harness(tmp_path) as h:  # device certificates for 365 days
        yield h


def _renew(channel: grpc.aio.Channel, key: object) -> object:
    stub = device_pb2_grpc.DeviceServiceStub(channel)
    return stub.RenewCertificate(
        device_pb2.RenewCertificateRequest(csr_pem=pki.make_csr(key, "whatever-the-csr-says")), timeout=10
    )


async def test_a_certificate_due_for_renewal_is_renewed_for_the_new_key_and_the_same_device(
    harness: Harness,
) -> None:
    device = await harness.enroll("cam")
    due = harness.mint(device.id, pki.DEVICE, days=1)  # one day left of a 365-day policy
    key = pki.new_key()
    reply = await _renew(harness.channel(due), key)
    assert reply.renewed
    renewed = pki.load_cert(reply.certificate_pem)
    assert pki.identity_of(reply.certificate_pem).name == device.id  # not what the CSR asked for
    assert renewed.public_key().public_numbers() == key.public_key().public_numbers()
    assert renewed.not_valid_after_utc.timestamp() * 1000 > time.time() * 1000 + 364 * DAY_MS
    fresh = harness.channel(credential_for(key, renewed))
    assignment = device_pb2_grpc.DeviceServiceStub(fresh).GetAssignment(device_pb2.GetAssignmentRequest())
    await assignment  # the new certificate works


async def test_a_fresh_certificate_is_not_renewed_and_the_device_is_told_when_to_ask(
    harness: Harness,
) -> None:
    device = await harness.enroll("cam")
    reply = await _renew(device.channel, pki.new_key())
    assert not reply.renewed and not reply.certificate_pem
    not_after_ms = pki.load_cert(device.credential.cert_pem).not_valid_after_utc.timestamp() * 1000
    assert abs(reply.renew_after_unix_ms - (not_after_ms - 365 * DAY_MS / 3)) < 60_000


async def test_a_revoked_device_cannot_renew_its_certificate(harness: Harness) -> None:
    device = await harness.enroll("cam")
    due = harness.channel(harness.mint(device.id, pki.DEVICE, days=1))
    await harness.operator_stub.RevokeDevice(
        operator_pb2.RevokeDeviceRequest(device_id=device.id), timeout=10
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _renew(due, pki.new_key())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (pki.REFUSAL_METADATA, pki.REFUSAL_REVOKED) in tuple(refused.value.trailing_metadata() or ())


async def test_a_renewal_with_a_bad_csr_is_refused(harness: Harness) -> None:
    device = await harness.enroll("cam")
    due = harness.channel(harness.mint(device.id, pki.DEVICE, days=1))
    stub = device_pb2_grpc.DeviceServiceStub(due)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.RenewCertificate(device_pb2.RenewCertificateRequest(csr_pem=b"not a csr"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
