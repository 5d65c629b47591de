"""A rollback that would send no device back is refused and records nothing, on every database: recorded, it
would still become what its selector was last told, and a device joining that selector later would get
nothing instead of the version the selector was deployed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from conftest import database_url

from edgefleet.devtools.rpc_harness import Harness, running_harness
from edgefleet.v1 import operator_pb2


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    url = "memory://" if request.param == "memory" else database_url(request.param, tmp_path)
    async with running_harness(tmp_path, database_url=url) as h:
        yield h


async def _rollback(harness: Harness, selector: str, validate_only: bool = False) -> grpc.aio.AioRpcError:
    request = operator_pb2.RollbackDevicesRequest(selector=selector, validate_only=validate_only)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await harness.operator_stub.RollbackDevices(request, timeout=10)
    return refused.value


async def _kinds(harness: Harness) -> list[str]:
    reply = await harness.operator_stub.ListDeployments(operator_pb2.ListDeploymentsRequest(), timeout=10)
    return [d.kind for d in reply.deployments]


async def test_a_rollback_that_reaches_no_device_is_refused_and_the_group_keeps_its_deployment(
    harness: Harness,
) -> None:
    cam = await harness.enroll("cam", group="lab")
    await harness.publish_model("digits", "1")
    deploy = operator_pb2.CreateDeploymentRequest(model_name="digits", version="1", selector="group:lab")
    await harness.operator_stub.CreateDeployment(deploy, timeout=10)

    for selector in ("group:nobody", "device:nobody"):
        for validate_only in (True, False):
            refused = await _rollback(harness, selector, validate_only)
            assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION, refused
            assert f"{selector} reaches no device that can go back (no device matches it)" in str(
                refused.details()
            )
    # cam matches but never ran a model before this one: it cannot go back, and it says so.
    refused = await _rollback(harness, "group:lab")
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"{cam.id}: has no previous model" in str(refused.details())
    assert "nothing was ordered or recorded" in str(refused.details())
    assert await _kinds(harness) == ["deploy"]

    # What lab was last told is still the deployment: a device joining it now gets digits 1.
    late = await harness.enroll("late", group="lab")
    devices = await harness.operator_stub.ListDevices(operator_pb2.ListDevicesRequest(), timeout=10)
    desired = {d.id: d.desired.target_path for d in devices.devices}
    assert desired[late.id].startswith("digits/1/"), desired
