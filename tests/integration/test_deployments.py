"""What an operator sees of past deployments: a later deployment takes devices over, and the earlier one keeps
counting them (as superseded), so the history says how many devices each rollout reached."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import database_url

from edgefleet.devtools.rpc_harness import Harness, running_harness
from edgefleet.v1 import operator_pb2


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    url = "memory://" if request.param == "memory" else database_url(request.param, tmp_path)
    async with running_harness(tmp_path, database_url=url) as h:
        yield h


async def _deployments(harness: Harness) -> dict[str, operator_pb2.DeploymentInfo]:
    reply = await harness.operator_stub.ListDeployments(operator_pb2.ListDeploymentsRequest(), timeout=10)
    return {d.version or d.kind: d for d in reply.deployments}


async def test_a_superseded_deployment_keeps_counting_the_devices_it_reached(harness: Harness) -> None:
    a, _ = await harness.enroll_devices(2)
    await harness.publish_model("digits", "1")
    await harness.publish_model("digits", "2")

    async def deploy(version: str, selector: str) -> operator_pb2.DeploymentInfo:
        request = operator_pb2.CreateDeploymentRequest(
            model_name="digits", version=version, selector=selector
        )
        reply = await harness.operator_stub.CreateDeployment(request, timeout=10)
        return reply.deployment

    assert (await deploy("1", "all")).devices_targeted == 2
    await harness.enroll("late")  # joins after the rollout started: it gets v1 too
    assert (await deploy("2", f"device:{a.id}")).devices_targeted == 1

    listed = await _deployments(harness)
    v1, v2 = listed["1"], listed["2"]
    assert (v1.devices_targeted, v1.devices_pending, v1.devices_superseded) == (3, 2, 1)
    assert (v2.devices_targeted, v2.devices_pending, v2.devices_superseded) == (1, 1, 0)
