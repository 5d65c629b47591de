"""A relay between a plaintext demo server and its agents that speaks the staged-rollout contract's device
fields for the server: `Assignment.shadow` (for the targets in `shadow_paths`) and `RollbackCommand.rollout_id`
(`rollout_id`). Everything else passes through as bytes, metadata (the bearer token) included.

For the agent's tests and bench/shadow_cost.py, so a real agent can be driven through shadow loads and
rollout-scoped rollbacks by a real server before the server's rollout engine sends them itself. Runs its own
event loop in a thread (`background.LoopThread`), like `faultproxy.FaultProxy`.

    with Relay(fleet.port) as relay:
        relay.shadow_paths.add("digits/2/float32.tflite")
        fleet.start_agent("cam", token, "--server", relay.address)

`drop_rollbacks` makes it a middlebox that loses the control stream's rollback orders: every
`RollbackCommand` on Connect is dropped (counted in `dropped_rollbacks`) while the stream itself stays up and
GetAssignment passes through untouched, so the device can learn of the order only from its periodic check
(`GetAssignmentResponse.rollback_pending` / `rollback_rollout_id`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from edgefleet.devtools.background import LoopThread
from edgefleet.v1 import device_pb2

SERVICE = device_pb2.DESCRIPTOR.services_by_name["DeviceService"]


class Relay(LoopThread):
    def __init__(self, target_port: int):
        super().__init__()
        self.target = f"127.0.0.1:{target_port}"
        self.shadow_paths: set[str] = set()
        self.rollout_id = ""
        self.drop_rollbacks = False
        self.dropped_rollbacks = 0
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None

    async def _start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target)
        self._server = grpc.aio.server()
        handlers = {m.name: self._handler(m) for m in SERVICE.methods}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()

    async def _stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
        if self._channel is not None:
            await self._channel.close()

    def rewrite(self, raw: bytes) -> bytes | None:
        """A control-stream message as the device gets it; None when it is dropped."""
        message = device_pb2.ServerMessage.FromString(raw)
        kind = message.WhichOneof("kind")
        if kind == "rollback" and self.drop_rollbacks:
            self.dropped_rollbacks += 1
            return None
        if kind == "assignment" and message.assignment.model.target_path in self.shadow_paths:
            message.assignment.shadow = True
        elif kind == "rollback" and self.rollout_id:
            message.rollback.rollout_id = self.rollout_id
        else:
            return raw
        return message.SerializeToString()

    def rewrite_check(self, raw: bytes) -> bytes:
        """The periodic check's answer: the same assignment as the stream's."""
        reply = device_pb2.GetAssignmentResponse.FromString(raw)
        if reply.HasField("assignment") and reply.assignment.model.target_path in self.shadow_paths:
            reply.assignment.shadow = True
            return reply.SerializeToString()
        return raw

    def _handler(self, method: Any) -> grpc.RpcMethodHandler:
        path = f"/{SERVICE.full_name}/{method.name}"
        assert self._channel is not None
        channel = self._channel

        def outgoing(context: grpc.aio.ServicerContext) -> dict[str, Any]:
            metadata = tuple((k, v) for k, v in context.invocation_metadata() or () if not k.startswith(":"))
            remaining = context.time_remaining()
            return {"metadata": metadata, "timeout": remaining if remaining and remaining < 1e6 else None}

        async def failed(context: grpc.aio.ServicerContext, e: grpc.aio.AioRpcError) -> None:
            await context.abort(e.code(), e.details() or "", tuple(e.trailing_metadata() or ()))

        if method.client_streaming and method.server_streaming:

            async def stream_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
                call = channel.stream_stream(path)(requests, **outgoing(context))
                try:
                    await context.send_initial_metadata(await call.initial_metadata())
                    async for raw in call:
                        out = self.rewrite(raw) if method.name == "Connect" else raw
                        if out is not None:
                            yield out
                except grpc.aio.AioRpcError as e:
                    await failed(context, e)

            return grpc.stream_stream_rpc_method_handler(stream_stream)
        if method.server_streaming:

            async def unary_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
                try:
                    async for raw in channel.unary_stream(path)(request, **outgoing(context)):
                        yield raw
                except grpc.aio.AioRpcError as e:
                    await failed(context, e)

            return grpc.unary_stream_rpc_method_handler(unary_stream)

        async def unary_unary(request: bytes, context: Any) -> bytes:
            try:
                reply: bytes = await channel.unary_unary(path)(request, **outgoing(context))
                return self.rewrite_check(reply) if method.name == "GetAssignment" else reply
            except grpc.aio.AioRpcError as e:
                await failed(context, e)
                raise

        return grpc.unary_unary_rpc_method_handler(unary_unary)
