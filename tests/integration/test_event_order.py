"""Every message a device sends is ordered (class 4 of the trust issue): events share the status reports'
persisted sequence, the server ignores anything not newer than what it accepted, and it tells the device
where to continue when a control stream opens. Attacks come over real mTLS streams with the device's own
certificate (a relay or a thief replaying what the device once sent)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from edgefleet.devtools.raw_rpc import call, rpc
from edgefleet.devtools.rpc_harness import Device, Harness, running_harness
from edgefleet.server.storage.records import DeviceRecord, now_ms
from edgefleet.v1 import common_pb2, device_pb2, operator_pb2

CONNECT = rpc("/edgefleet.v1.DeviceService/Connect")
V1 = "digits/1/float32.tflite"


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_harness(tmp_path) as h:
        yield h


def _status(sequence: int, current: str = V1) -> bytes:
    name, version, variant = current.removesuffix(".tflite").split("/")
    return device_pb2.DeviceMessage(
        status=device_pb2.DeviceStatus(
            current=common_pb2.ModelRef(
                target_path=current, model_name=name, version=version, variant=variant
            ),
            capabilities=common_pb2.Capabilities(runtime="ai-edge-litert", cpu_arch="x86_64", cpu_count=2),
            sequence=sequence,
            sent_at_unix_ms=now_ms(),
        )
    ).SerializeToString()


def _event(
    sequence: int,
    stage: int,
    target: str = V1,
    deployment_id: str = "",
    sha256: str = "",
    *,
    at_ms: int = 0,
    repeated: bool = False,
) -> bytes:
    return device_pb2.DeviceMessage(
        event=device_pb2.UpdateEvent(
            target_path=target, stage=stage, reason="r", at_unix_ms=at_ms or now_ms(), sequence=sequence,
            deployment_id=deployment_id, target_sha256=sha256, repeated=repeated,
        )
    ).SerializeToString()  # fmt: skip


HEALTHY = common_pb2.UpdateStage.Value("UPDATE_STAGE_HEALTHY")
FAILED = common_pb2.UpdateStage.Value("UPDATE_STAGE_FAILED")


async def _send(device: Device, *messages: bytes) -> None:
    assert (await call(device.channel, CONNECT, list(messages))).code == grpc.StatusCode.OK


async def _hello(device: Device) -> int:
    """Opens a control stream and returns the first thing the server says: the last accepted sequence."""
    stream = device.stub.Connect()
    try:
        first = await asyncio.wait_for(stream.read(), 10)
        assert first.WhichOneof("kind") == "hello"
        return int(first.hello.last_sequence)
    finally:
        stream.cancel()


async def _record(harness: Harness, device: Device) -> DeviceRecord:
    return await asyncio.to_thread(harness.fleet.store.get_device, device.id)


async def test_replayed_old_healthy_event_on_a_second_stream_does_not_change_the_servers_view(
    harness: Harness,
) -> None:
    device = await harness.enroll("cam")
    await _send(device, _status(1), _event(2, HEALTHY), _event(3, FAILED))
    assert (await _record(harness, device)).last_stage == "failed"
    events_before = await harness.fleet.devices.events(device.id, 100)

    await _send(device, _event(2, HEALTHY), _event(3, HEALTHY), _event(0, HEALTHY))  # replays, a forgery of 0
    record = await _record(harness, device)
    assert record.last_stage == "failed"
    assert await harness.fleet.devices.events(device.id, 100) == events_before
    assert harness.fleet.devices.ignored_messages == 3


async def test_status_and_events_share_one_sequence_so_an_old_status_after_an_event_is_stale(
    harness: Harness,
) -> None:
    device = await harness.enroll("cam")
    await _send(device, _status(1, V1), _event(2, HEALTHY))
    await _send(device, _status(2, "digits/9/float32.tflite"))  # older than the event: a replay
    record = await _record(harness, device)
    assert record.current is not None and record.current.target_path == V1


async def test_control_stream_opens_with_the_last_accepted_sequence_so_a_reset_device_continues(
    harness: Harness,
) -> None:
    device = await harness.enroll("cam")
    assert await _hello(device) == 0
    await _send(device, _status(1), _event(7, HEALTHY))
    assert await _hello(device) == 7  # a device that lost its state file learns where to go on


async def test_a_single_absurd_sequence_costs_one_round_trip_not_the_device(harness: Harness) -> None:
    device = await harness.enroll("cam")
    absurd = 2**62
    await _send(device, _status(absurd))
    assert await _hello(device) == absurd
    await _send(device, _status(absurd + 1, "digits/2/float32.tflite"))
    record = await _record(harness, device)
    assert record.current is not None and record.current.target_path == "digits/2/float32.tflite"


async def test_event_about_another_deployment_or_target_does_not_change_the_deployments_view(
    harness: Harness,
) -> None:
    device = await harness.enroll("cam")
    await harness.publish_model("digits", "1")
    v2 = await harness.publish_model("digits", "2")
    await harness.operator_stub.CreateDeployment(
        operator_pb2.CreateDeploymentRequest(model_name="digits", version="2", selector="all"), timeout=10
    )
    record = await _record(harness, device)
    assert record.desired_target == v2.target_path and record.desired_deployment
    deployment, sha = record.desired_deployment, v2.sha256
    await _send(device, _status(1), _event(2, FAILED, v2.target_path, deployment, sha))
    assert (await _record(harness, device)).last_stage == "failed"
    # Newer, but about another target, or another (old) deployment: history, not the deployment's count.
    await _send(
        device, _event(3, HEALTHY, V1, deployment, sha), _event(4, HEALTHY, v2.target_path, "old", sha)
    )
    assert (await _record(harness, device)).last_stage == "failed"
    await _send(device, _event(5, HEALTHY, v2.target_path, deployment, sha))
    assert (await _record(harness, device)).last_stage == "healthy"


async def test_healthy_event_about_other_bytes_at_the_assigned_path_is_kept_but_never_counts_as_healthy(
    harness: Harness,
) -> None:
    """A raw device (or a relay with its certificate) reports "healthy" for the path and deployment it was
    assigned, but for other bytes (or for none): the server keeps it in the device's history and counts it
    for nothing; only the assigned sha256 makes the deployment's device healthy."""
    device = await harness.enroll("cam")
    v1 = await harness.publish_model("digits", "1")
    await harness.operator_stub.CreateDeployment(
        operator_pb2.CreateDeploymentRequest(model_name="digits", version="1", selector="all"), timeout=10
    )
    record = await _record(harness, device)
    deployment = record.desired_deployment
    assert record.desired_target == v1.target_path and deployment
    running = _status(1, v1.target_path)
    await _send(device, running, _event(2, FAILED, v1.target_path, deployment, v1.sha256))
    other = "0" * 64
    await _send(
        device,
        _event(3, HEALTHY, v1.target_path, deployment, other),
        _event(4, HEALTHY, v1.target_path, deployment, ""),
        _event(5, HEALTHY, v1.target_path, "", other.upper()),
    )
    record = await _record(harness, device)
    assert record.last_stage == "failed"
    counts = await asyncio.to_thread(harness.fleet.store.deployment_counts)
    assert counts[deployment].healthy == 0
    history = [(e.stage, e.target_path) for e in await harness.fleet.devices.events(device.id, 100)]
    assert history.count(("healthy", v1.target_path)) == 3  # the device's reports, kept as history
    await _send(device, _event(6, HEALTHY, v1.target_path, deployment, v1.sha256.upper()))
    assert (await _record(harness, device)).last_stage == "healthy"
    counts = await asyncio.to_thread(harness.fleet.store.deployment_counts)
    assert counts[deployment].healthy == 1


async def test_the_event_a_device_repeats_on_a_new_stream_counts_once_even_when_the_first_was_lost(
    harness: Harness,
) -> None:
    """A device sends its last event again after the status on every new stream, marked repeated: the
    first copy may have died in flight with a killed server. The server takes a repeat it never got, and
    ignores one it has recorded; an event not marked repeated is never taken for one."""
    device = await harness.enroll("cam")
    v1 = await harness.publish_model("digits", "1")
    await harness.operator_stub.CreateDeployment(
        operator_pb2.CreateDeploymentRequest(model_name="digits", version="1", selector="all"), timeout=10
    )
    deployment = (await _record(harness, device)).desired_deployment
    at = now_ms()
    # "healthy" was lost with the stream (never sent here): the next stream repeats it.
    await _send(device, _status(1), _event(2, FAILED, v1.target_path, deployment, v1.sha256, at_ms=at - 5))
    assert (await _record(harness, device)).last_stage == "failed"
    healthy = dict(target=v1.target_path, deployment_id=deployment, sha256=v1.sha256, at_ms=at)
    await _send(device, _status(3), _event(4, HEALTHY, **healthy, repeated=True))  # type: ignore[arg-type]
    assert (await _record(harness, device)).last_stage == "healthy"
    # Repeated again on the next stream: the server has it, so it is ignored and the history unchanged.
    await _send(device, _status(5), _event(6, HEALTHY, **healthy, repeated=True))  # type: ignore[arg-type]
    history = [e.stage for e in await harness.fleet.devices.events(device.id, 100)]
    assert history.count("healthy") == 1, history
    # The same fields without the mark: a new report, kept.
    await _send(device, _event(7, HEALTHY, **healthy))  # type: ignore[arg-type]
    history = [e.stage for e in await harness.fleet.devices.events(device.id, 100)]
    assert history.count("healthy") == 2, history
    # A repeat that names no order is late news about none: history only (an unmarked one would count).
    await _send(device, _status(8), _event(9, FAILED, v1.target_path, "", v1.sha256, repeated=True))
    assert (await _record(harness, device)).last_stage == "healthy"
