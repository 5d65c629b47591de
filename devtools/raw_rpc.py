"""Every RPC of the fleet's services by its descriptor, called with raw bytes: what a hostile client can send.

`rpcs()` walks the service descriptors, so a new RPC is covered by any test that iterates them; `call` and
`call_sync` send raw serialized bytes and return what came back as an `Outcome`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2

from edgefleet.v1 import common_pb2, device_pb2, operator_pb2, rollout_pb2

T = TypeVar("T")

DEVICE_SERVICE: ServiceDescriptor = device_pb2.DESCRIPTOR.services_by_name["DeviceService"]
OPERATOR_SERVICE: ServiceDescriptor = operator_pb2.DESCRIPTOR.services_by_name["OperatorService"]
ROLLOUT_SERVICE: ServiceDescriptor = rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"]
SERVICES = (DEVICE_SERVICE, OPERATOR_SERVICE, ROLLOUT_SERVICE)
ENROLL_PATH = "/edgefleet.v1.DeviceService/Enroll"
HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check"


def simulated_capabilities(hardware_class: str) -> common_pb2.Capabilities:
    """What a simulated device declares: a LiteRT device with room for any test model."""
    return common_pb2.Capabilities(
        runtime="ai-edge-litert",
        runtime_version="2.0.0",
        cpu_arch="x86_64",
        cpu_count=4,
        memory_total_bytes=2**31,
        memory_available_bytes=2**30,
        disk_free_bytes=2**34,
        hardware_class=hardware_class,
    )


CAPABILITIES = simulated_capabilities("test-bench")


# ---- RPCs by descriptor, called with raw bytes ------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    path: str  # "/edgefleet.v1.DeviceService/Enroll"
    service: str  # "DeviceService"
    name: str  # "Enroll"
    client_streaming: bool
    server_streaming: bool
    request: type[Message]

    @property
    def kind(self) -> str:
        return f"{'stream' if self.client_streaming else 'unary'}_{'stream' if self.server_streaming else 'unary'}"

    def __str__(self) -> str:
        return self.path


def rpcs(*services: ServiceDescriptor) -> list[Rpc]:
    """Every RPC of the given services (default: DeviceService and OperatorService)."""
    found = []
    for service in services or SERVICES:
        for method in service.methods:
            found.append(
                Rpc(
                    f"/{service.full_name}/{method.name}",
                    service.name,
                    method.name,
                    method.client_streaming,
                    method.server_streaming,
                    GetMessageClass(method.input_type),
                )
            )
    return found


def rpc(path: str) -> Rpc:
    return next(r for r in rpcs() if r.path == path)


HEALTH_CHECK = Rpc(HEALTH_CHECK_PATH, "Health", "Check", False, False, health_pb2.HealthCheckRequest)


@dataclass
class Outcome:
    """How a call ended: the status code (OK included), its details, trailers and any responses (raw)."""

    code: grpc.StatusCode
    details: str = ""
    trailers: dict[str, str] = field(default_factory=dict)
    responses: list[bytes] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


def _raw(data: bytes) -> bytes:
    return data


def _trailers(metadata: Any) -> dict[str, str]:
    return {key: value for key, value in (metadata or ()) if isinstance(value, str)}


async def call(
    channel: grpc.aio.Channel,
    method: Rpc,
    messages: Sequence[bytes] = (b"",),
    *,
    timeout: float = 10.0,
    metadata: Sequence[tuple[str, str]] | None = None,
) -> Outcome:
    """Calls `method` with raw request bytes (one for a unary request, all of them for a request stream) and
    returns how it ended; never raises for a status.

    grpc.aio clients have a race (grpc/grpc#36066): when the server ends a client-streaming call while a
    request write is in flight, the client replaces the server's status with its own "INTERNAL: Internal
    error from Core". That status never left the server, so such a call is made again (the server ended
    it early, so doing it again only repeats a refusal)."""
    for _attempt in range(5):
        outcome, client_side = await _call_once(channel, method, messages, timeout, metadata)
        if not client_side:
            break
    return outcome


async def _call_once(
    channel: grpc.aio.Channel,
    method: Rpc,
    messages: Sequence[bytes],
    timeout: float,
    metadata: Sequence[tuple[str, str]] | None,
) -> tuple[Outcome, bool]:
    factory = getattr(channel, method.kind)
    multi = factory(method.path, request_serializer=_raw, response_deserializer=_raw)
    request = iter(list(messages)) if method.client_streaming else messages[0]
    responses: list[bytes] = []
    invocation = multi(request, timeout=timeout, metadata=metadata)
    try:
        if method.server_streaming:
            async for response in invocation:
                responses.append(response)
        else:
            responses.append(await invocation)
        trailers = _trailers(await invocation.trailing_metadata())
        return Outcome(grpc.StatusCode.OK, "", trailers, responses), False
    except grpc.aio.AioRpcError as e:
        client_side = (
            method.client_streaming
            and e.code() == grpc.StatusCode.INTERNAL
            and e.details() == "Internal error from Core"
            and "execute_batch" in (e.debug_error_string() or "")
        )
        outcome = Outcome(e.code(), e.details() or "", _trailers(e.trailing_metadata()), responses)
        return outcome, client_side


def call_sync(
    channel: grpc.Channel, method: Rpc, messages: Sequence[bytes] = (b"",), *, timeout: float = 10.0
) -> Outcome:
    """`call` for a blocking channel."""
    factory = getattr(channel, method.kind)
    multi = factory(method.path, request_serializer=_raw, response_deserializer=_raw)
    request = iter(list(messages)) if method.client_streaming else messages[0]
    responses: list[bytes] = []
    try:
        if method.server_streaming:
            stream = multi(request, timeout=timeout)
            responses.extend(stream)
            return Outcome(grpc.StatusCode.OK, "", _trailers(stream.trailing_metadata()), responses)
        response, done = multi.with_call(request, timeout=timeout)
        return Outcome(grpc.StatusCode.OK, "", _trailers(done.trailing_metadata()), [response])
    except grpc.RpcError as e:
        assert isinstance(e, grpc.Call)
        return Outcome(e.code(), e.details() or "", _trailers(e.trailing_metadata()), responses)
