"""Who may call what: deny-by-default, per service and per RPC.

The policy is built from the service descriptors, so every RPC of DeviceService needs a device credential
(except Enroll, which takes a one-time token in its body) and every RPC of OperatorService needs the
operator's credential. A method that is not in the policy (a new service, a typo) is refused.

Credentials are bearer tokens in the `authorization` metadata: device tokens issued at enrollment, and the
operator token the server writes to `<data dir>/operator.token` on first start. A device's identity is
always the one its credential resolves to; request fields never name the caller.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from edgefleet.durable import write_atomic
from edgefleet.v1 import device_pb2, operator_pb2

PUBLIC = "public"
DEVICE = "device"
OPERATOR = "operator"


def build_policy() -> dict[str, str]:
    policy: dict[str, str] = {}
    for module, service, role in (
        (device_pb2, "DeviceService", DEVICE),
        (operator_pb2, "OperatorService", OPERATOR),
    ):
        descriptor = module.DESCRIPTOR.services_by_name[service]
        for method in descriptor.methods:
            policy[f"/{descriptor.full_name}/{method.name}"] = role
    policy["/edgefleet.v1.DeviceService/Enroll"] = PUBLIC
    policy["/grpc.health.v1.Health/Check"] = PUBLIC
    policy["/grpc.health.v1.Health/Watch"] = PUBLIC
    return policy


@dataclass(frozen=True)
class Principal:
    role: str
    id: str


def bearer(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return ""


def load_or_create_operator_token(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    token = "op_" + secrets.token_urlsafe(32)
    write_atomic(path, token.encode() + b"\n", mode=0o600)
    return token


class Authenticator:
    """Resolves a bearer token to a Principal. Device lookups are cached in memory (bounded)."""

    def __init__(self, operator_token: str, device_lookup: Callable[[str], Awaitable[str | None]]):
        self._operator_token = operator_token
        self._device_lookup = device_lookup
        self._cache: dict[str, str] = {}

    async def resolve(self, token: str) -> Principal | None:
        if not token:
            return None
        if hmac.compare_digest(token.encode(), self._operator_token.encode()):
            return Principal(OPERATOR, "operator")
        device_id = self._cache.get(token)
        if device_id is None:
            device_id = await self._device_lookup(token)
            if device_id is None:
                return None
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[token] = device_id
        return Principal(DEVICE, device_id)

    async def principal(self, context: grpc.aio.ServicerContext) -> Principal:
        """For handlers: the caller (the interceptor has already refused anyone else)."""
        found = await self.resolve(bearer(context.invocation_metadata()))
        if found is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "credentials are missing or not valid")
        assert found is not None
        return found


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only refuses."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator, policy: dict[str, str] | None = None):
        self.authenticator = authenticator
        self.policy = policy or build_policy()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        role = self.policy.get(details.method)
        if role is None:
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED, "this method is not open to anyone")
        if role == PUBLIC:
            return handler
        principal = await self.authenticator.resolve(bearer(details.invocation_metadata))
        if principal is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, "credentials are missing or not valid")
        if principal.role != role:
            return _refusal(
                handler, grpc.StatusCode.PERMISSION_DENIED, f"a {principal.role} may not call this"
            )
        return handler
