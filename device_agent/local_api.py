"""The agent's local inference service for applications on the device: a Unix socket (and optionally a
loopback port), never a public address. Applications in Python can also call `Agent.infer` directly.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

import grpc
from edgefleet.agent.serving import NoModelError

from edgefleet import errors
from edgefleet.tensors import from_proto, to_proto
from edgefleet.v1 import common_pb2, local_pb2, local_pb2_grpc

if TYPE_CHECKING:
    from edgefleet.agent.agent import Agent


class InferenceServicer(local_pb2_grpc.InferenceServiceServicer):
    def __init__(self, agent: Agent):
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
        state = self.agent.state
        return local_pb2.GetAgentStatusResponse(
            current=common_pb2.ModelRef(**state.current) if state.current else None,
            previous=common_pb2.ModelRef(**state.previous) if state.previous else None,
            runtime=self.agent.runtime,
            runtime_version=self.agent.capabilities().runtime_version,
            connected=self.agent.connected,
        )


async def start_local_service(agent: Agent, socket_path: str, port: int) -> grpc.aio.Server:
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
