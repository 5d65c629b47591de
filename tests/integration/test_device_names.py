"""A device's name works wherever its id does (selectors, telemetry, events, revocation), an unknown device
is NOT_FOUND the same way everywhere, and a name two devices share is a clear error listing their ids.

Through the operator RPCs of an in-process server, against each storage backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from conftest import database_url

from edgefleet.devtools.rpc_harness import Harness, running_harness
from edgefleet.v1 import operator_pb2


@pytest.fixture(params=["memory", "sqlite"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    url = "memory://" if request.param == "memory" else database_url(request.param, tmp_path)
    async with running_harness(tmp_path, database_url=url) as h:
        yield h


async def _deploy(harness: Harness, selector: str) -> operator_pb2.DeploymentInfo:
    request = operator_pb2.CreateDeploymentRequest(model_name="digits", version="1", selector=selector)
    return (await harness.operator_stub.CreateDeployment(request, timeout=10)).deployment


async def test_a_device_name_selects_deploys_and_reads_like_its_id(harness: Harness) -> None:
    cam = await harness.enroll("cam-1")
    await harness.enroll("door")
    await harness.publish_model("digits", "1")
    deployed = await _deploy(harness, "device:cam-1")
    assert deployed.devices_targeted == 1 and deployed.selector == f"device:{cam.id}"
    stub = harness.operator_stub
    listed = await stub.ListDevices(operator_pb2.ListDevicesRequest(selector="device:cam-1"), timeout=10)
    assert [d.id for d in listed.devices] == [cam.id]
    await stub.GetTelemetry(operator_pb2.GetTelemetryRequest(device_id="cam-1"), timeout=10)
    await stub.ListEvents(operator_pb2.ListEventsRequest(device_id="cam-1"), timeout=10)
    await stub.RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id="cam-1"), timeout=10)
    (revoked,) = (await stub.ListDevices(operator_pb2.ListDevicesRequest(), timeout=10)).devices[:1]
    assert revoked.id == cam.id and revoked.revoked


async def test_an_unknown_device_is_not_found_for_telemetry_and_events_alike(harness: Harness) -> None:
    stub = harness.operator_stub
    for call in (
        stub.GetTelemetry(operator_pb2.GetTelemetryRequest(device_id="cam-1"), timeout=10),
        stub.ListEvents(operator_pb2.ListEventsRequest(device_id="cam-1"), timeout=10),
        stub.RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id="cam-1"), timeout=10),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_shared_name_is_an_ambiguity_error_listing_the_ids(harness: Harness) -> None:
    a, b = await harness.enroll("cam"), await harness.enroll("cam")
    await harness.publish_model("digits", "1")
    listed = operator_pb2.ListDeploymentsRequest()
    for call in (
        harness.operator_stub.GetTelemetry(operator_pb2.GetTelemetryRequest(device_id="cam"), timeout=10),
        harness.operator_stub.CreateDeployment(
            operator_pb2.CreateDeploymentRequest(model_name="digits", version="1", selector="device:cam"),
            timeout=10,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert a.id in refused.value.details() and b.id in refused.value.details()
    assert not (
        await harness.operator_stub.ListDeployments(listed, timeout=10)
    ).deployments  # nothing written
    # Each id still works.
    assert (await _deploy(harness, f"device:{a.id}")).devices_targeted == 1
