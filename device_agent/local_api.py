"""The agent's local inference service for applications on the device: a Unix socket (and optionally a
loopback port), never a public address. Applications in Python can also call `Agent.infer` directly.

It needs only what `LocalAgent` names (inference and a status), not the agent itself.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np

from edgefleet import errors
from edgefleet.agent.decisions import Deferral
from edgefleet.agent.serving import NoModelError, Result
from edgefleet.convert import ref_to_proto
from edgefleet.tensors import from_proto, to_proto
from edgefleet.v1 import local_pb2, local_pb2_grpc
from edgefleet.values import ModelRef


@dataclass(frozen=True)
class LocalStatus:
    """What an application on the device may learn about the agent."""

    current: ModelRef | None
    previous: ModelRef | None
    runtime: str
    runtime_version: str
    connected: bool  # to the fleet server
    shadow: ModelRef | None = None  # a candidate compared in shadow beside `current`
    deferred_until_ms: int = 0  # installs wait until then (an application asked); 0 = not deferred


class LocalAgent(Protocol):
    """What the local service needs of an agent."""

    def infer(self, inputs: list[np.ndarray]) -> Result:
        """Blocking; raises what `Serving.infer` raises."""
        ...

    def local_status(self) -> LocalStatus: ...

    def defer_updates(self, seconds: int, reason: str) -> Deferral:
        """Raises InvalidRequestError for a negative request."""
        ...


class InferenceServicer(local_pb2_grpc.InferenceServiceServicer):
    def __init__(self, agent: LocalAgent):
        self.agent = agent

    async def Infer(self, request: local_pb2.InferRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            inputs = [from_proto(t) for t in request.inputs]
            result = await asyncio.to_thread(self.agent.infer, inputs)
        except NoModelError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except errors.InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except errors.ModelError as e:
            await context.abort(grpc.StatusCode.INTERNAL, f"model failed: {e}")
        names = result.output_names
        return local_pb2.InferResponse(
            outputs=[
                to_proto(names[i] if i < len(names) else f"output_{i}", o)
                for i, o in enumerate(result.outputs)
            ],
            target_path=result.target_path,
            version=result.version,
        )

    async def GetAgentStatus(self, request: local_pb2.GetAgentStatusRequest, context: Any) -> Any:
        status = self.agent.local_status()
        return local_pb2.GetAgentStatusResponse(
            current=ref_to_proto(status.current) if status.current else None,
            previous=ref_to_proto(status.previous) if status.previous else None,
            runtime=status.runtime,
            runtime_version=status.runtime_version,
            connected=status.connected,
            shadow=ref_to_proto(status.shadow) if status.shadow else None,
            deferred_until_unix_ms=status.deferred_until_ms,
        )

    async def DeferUpdates(self, request: local_pb2.DeferUpdatesRequest, context: Any) -> Any:
        """Bounded by the agent's config (the answer says what was granted); 0 seconds cancels."""
        if len(request.reason) > 1000:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "reason is longer than 1000 characters")
        try:
            deferral = await asyncio.to_thread(self.agent.defer_updates, request.seconds, request.reason)
        except errors.InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{e}; ask 0 to cancel a deferral")
        return local_pb2.DeferUpdatesResponse(
            deferred_until_unix_ms=deferral.until_ms, granted_seconds=deferral.granted_s
        )


async def start_local_service(agent: LocalAgent, socket_path: str, port: int) -> grpc.aio.Server:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 2**20)])
    local_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(agent), server)
    if socket_path:
        if os.path.exists(socket_path):
            os.unlink(socket_path)  # left by a previous run
        server.add_insecure_port(f"unix:{socket_path}")
    if port:
        server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    if socket_path:
        os.chmod(socket_path, 0o660)
    return server
