"""Who may call what: deny-by-default, per service and per RPC.

The policy is built from the service descriptors: every RPC of DeviceService needs a device credential
(except Enroll, which takes a one-time token in its body and is served on the enrollment port), every RPC
of OperatorService needs an operator credential. A method not in the policy (a new service, a typo) is
refused to everyone.

Credentials: with TLS (the default) the client certificate the TLS handshake verified against the fleet CA;
its organizational unit is the role and its common name the device id. On a server explicitly run as a
plaintext local demo: bearer tokens in the `authorization` metadata. Either way the identity comes from the
channel's credentials, never from a request field, and a revoked device is refused.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from edgefleet import pki
from edgefleet.durable import write_atomic
from edgefleet.errors import TransportError
from edgefleet.v1 import device_pb2, operator_pb2, rollout_pb2

PUBLIC = "public"
DEVICE = pki.DEVICE
OPERATOR = pki.OPERATOR
_HEALTH = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")
ENROLL = "/edgefleet.v1.DeviceService/Enroll"


def build_policy() -> dict[str, str]:
    """Every RPC of the fleet's services, mapped to the one role that may call it."""
    policy: dict[str, str] = {}
    for module, service, role in (
        (device_pb2, "DeviceService", DEVICE),
        (operator_pb2, "OperatorService", OPERATOR),
        (rollout_pb2, "RolloutService", OPERATOR),
    ):
        descriptor = module.DESCRIPTOR.services_by_name[service]
        for method in descriptor.methods:
            policy[f"/{descriptor.full_name}/{method.name}"] = role
    policy[ENROLL] = PUBLIC
    for method in _HEALTH:
        policy[method] = PUBLIC
    return policy


def enrollment_policy() -> dict[str, str]:
    """The enrollment port serves Enroll (and health) and nothing else."""
    return {ENROLL: PUBLIC, **{m: PUBLIC for m in _HEALTH}}


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
    """Resolves a call's credentials to a Principal, or None.

    `device_status(device_id_or_token, by_token)` returns (device_id, revoked) or None; answers are cached
    for `cache_seconds` so a busy fleet does not hit the database on every call (`forget` on revocation).
    """

    def __init__(
        self,
        *,
        tls: bool,
        operator_token: str,
        device_status: Callable[[str, bool], Awaitable[tuple[str, bool] | None]],
        cache_seconds: float = 10.0,
    ):
        self.tls = tls
        self._operator_token = operator_token
        self._device_status = device_status
        self._cache_seconds = cache_seconds
        self._cache: dict[tuple[str, bool], tuple[float, tuple[str, bool] | None]] = {}

    def forget(self) -> None:
        self._cache.clear()

    async def _device(self, key: str, by_token: bool) -> tuple[str, bool] | None:
        now = time.monotonic()
        cached = self._cache.get((key, by_token))
        if cached is None or now - cached[0] > self._cache_seconds:
            if len(self._cache) > 100_000:
                self._cache.clear()
            cached = (now, await self._device_status(key, by_token))
            self._cache[(key, by_token)] = cached
        return cached[1]

    async def resolve(self, context: grpc.aio.ServicerContext) -> Principal | None:
        """The caller, or None when unknown. A revoked device is refused here, distinctly (UNAUTHENTICATED with
        `edgefleet-refusal: revoked` in the trailing metadata), so its agent stops instead of retrying."""
        if self.tls:
            certs = (context.auth_context() or {}).get("x509_pem_cert") or []
            if not certs:
                return None
            identity = pki.identity_of(bytes(certs[0]))
            if identity.role == OPERATOR:
                return Principal(OPERATOR, identity.name)
            if identity.role == DEVICE:
                return await self._device_principal(context, identity.name, False)
            return None
        token = bearer(context.invocation_metadata())
        if not token:
            return None
        if hmac.compare_digest(token.encode(), self._operator_token.encode()):
            return Principal(OPERATOR, "operator")
        return await self._device_principal(context, token, True)

    async def _device_principal(
        self, context: grpc.aio.ServicerContext, key: str, by_token: bool
    ) -> Principal | None:
        found = await self._device(key, by_token)
        if found is None:
            return None
        device_id, revoked = found
        if revoked:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "this device was revoked by the fleet",
                trailing_metadata=((pki.REFUSAL_METADATA, pki.REFUSAL_REVOKED),),
            )
        return Principal(DEVICE, device_id)

    async def checked(self, context: grpc.aio.ServicerContext) -> Principal | None:
        """`resolve`, with a database that is busy or down answered UNAVAILABLE (retryable)."""
        try:
            return await self.resolve(context)
        except TransportError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e)[:300])
            raise  # abort raises; this keeps the type checker informed

    async def principal(self, context: grpc.aio.ServicerContext) -> Principal:
        """For handlers: the caller (the gate has already refused anyone else)."""
        found = await self.checked(context)
        if found is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "credentials are missing, revoked or not valid"
            )
        assert found is not None
        return found


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler in a gate that checks the caller's role against the policy before it runs.

    The gate sits inside the handler (not in the interceptor itself) because only the call's context knows
    the TLS peer certificate."""

    def __init__(
        self,
        authenticator: Authenticator,
        policy: dict[str, str],
        closed: str = "this method is not open to anyone",
    ):
        self.authenticator = authenticator
        self.policy = policy
        self.closed = closed  # what a caller of a method outside the policy is told

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        role = self.policy.get(details.method)
        authenticator = self.authenticator
        closed = self.closed

        async def gate(context: grpc.aio.ServicerContext) -> None:
            if role == PUBLIC:
                return
            if role is None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, closed)
            principal = await authenticator.checked(context)
            if principal is None:
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED, "credentials are missing, revoked or not valid"
                )
            elif principal.role != role:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, f"a {principal.role} may not call this"
                )

        return _guarded(handler, gate)


def _guarded(
    handler: grpc.RpcMethodHandler, gate: Callable[[grpc.aio.ServicerContext], Awaitable[None]]
) -> grpc.RpcMethodHandler:
    """The same handler with `gate(context)` run before its behaviour. A unary request is decoded after the
    gate, by us: grpc would answer bytes that are not a protobuf with UNKNOWN, we answer INVALID_ARGUMENT."""
    decode = handler.request_deserializer
    serializer = handler.response_serializer

    async def request_of(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return decode(raw) if decode else raw
        except Exception:  # DecodeError and friends: the caller's bytes are not this message
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the request is not a valid protobuf message"
            )

    if handler.unary_unary:
        unary_unary = handler.unary_unary

        async def uu(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            await gate(context)
            return await unary_unary(await request_of(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(uu, response_serializer=serializer)
    if handler.unary_stream:
        unary_stream = handler.unary_stream

        async def us(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            await gate(context)
            async for response in unary_stream(await request_of(raw, context), context):
                yield response

        return grpc.unary_stream_rpc_method_handler(us, response_serializer=serializer)
    kwargs = {"request_deserializer": decode, "response_serializer": serializer}
    if handler.stream_unary:
        stream_unary = handler.stream_unary

        async def su(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            await gate(context)
            return await stream_unary(requests, context)

        return grpc.stream_unary_rpc_method_handler(su, **kwargs)
    stream_stream = handler.stream_stream

    async def ss(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        await gate(context)
        async for response in stream_stream(requests, context):
            yield response

    return grpc.stream_stream_rpc_method_handler(ss, **kwargs)
