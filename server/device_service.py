"""The device service: what devices call. Each handler translates protobuf into typed values
(`edgefleet.convert`), calls the logic (`Fleet.devices`, `.repository`, `.streams`) and translates the
answer back; errors become status codes in `rpc_status.status_for_errors`.

Authorization is `server.auth.AuthInterceptor`'s; the caller's identity comes from
`Authenticator.principal`. What one device, and all of them together, may hold of the server at once is
bounded here (`DeviceLimits`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from edgefleet import convert, errors, pki
from edgefleet.server.auth import Authenticator
from edgefleet.server.fleet import Fleet
from edgefleet.server.limits import RateLimiter
from edgefleet.server.rpc_status import check_name, check_target_path, status_for_errors
from edgefleet.server.streams import AssignmentPush, Disconnect, Push, RollbackPush
from edgefleet.v1 import device_pb2, device_pb2_grpc

log = logging.getLogger("edgefleet.server")

DOWNLOAD_CHUNK_BYTES = 64 * 1024  # what a stuck reader pins in server memory is a few of these


@dataclass(frozen=True)
class DeviceLimits:
    """What one device, and all of them together, may hold of the server at once."""

    max_connected_devices: int = 50_000
    downloads_per_device: int = 2
    telemetry_in_flight: int = 64  # reports being stored at once, fleet-wide; more are told to retry


def push_to_proto(push: Push) -> device_pb2.ServerMessage:
    if isinstance(push, AssignmentPush):
        return device_pb2.ServerMessage(
            assignment=device_pb2.Assignment(
                model=convert.ref_to_proto(push.model.ref()),
                deployment_id=push.deployment_id,
                shadow=push.shadow,
                rollout_id=push.rollout_id,
                retry=push.retry,
            )
        )
    assert isinstance(push, RollbackPush)
    return device_pb2.ServerMessage(
        rollback=device_pb2.RollbackCommand(
            command_id=push.command_id, reason=push.reason, rollout_id=push.rollout_id
        )
    )


class DeviceServicer(device_pb2_grpc.DeviceServiceServicer):
    def __init__(
        self,
        fleet: Fleet,
        auth: Authenticator,
        telemetry_limit: RateLimiter,
        limits: DeviceLimits = DeviceLimits(),
    ):
        self.fleet = fleet
        self.auth = auth
        self.telemetry_limit = telemetry_limit
        self.limits = limits
        self._downloads: dict[str, int] = {}
        self._telemetry_in_flight = 0

    async def Enroll(self, request: device_pb2.EnrollRequest, context: grpc.aio.ServicerContext) -> Any:
        async with status_for_errors(context):
            if not request.enrollment_token or len(request.enrollment_token) > 256:
                raise errors.InvalidRequestError("enrollment_token is required")
            check_name("device name", request.device_name)
            try:
                device, secret, certificate = await self.fleet.devices.enroll(
                    request.enrollment_token,
                    request.device_name,
                    convert.capabilities_from_proto(request.capabilities),
                    request.csr_pem,
                    request.trust_root_sha256,
                )
            except (UnsupportedAlgorithm, x509.InvalidVersion) as e:
                # pki.load_csr_checked lets these through (a CSR naming an unknown curve or key type, or
                # an unknown version); it runs before the token is spent: the caller's error, say so.
                raise errors.InvalidRequestError(f"unsupported certificate signing request: {e}") from e
            if certificate:
                assert self.fleet.ca is not None
                return device_pb2.EnrollResponse(
                    device_id=device.id,
                    group=device.group,
                    certificate_pem=certificate,
                    ca_certificate_pem=pki.cert_pem(self.fleet.ca.cert),
                )
            return device_pb2.EnrollResponse(device_id=device.id, device_token=secret, group=device.group)

    async def RenewCertificate(
        self, request: device_pb2.RenewCertificateRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        async with status_for_errors(context):
            principal = await self.auth.principal(context)
            presented = (context.auth_context() or {}).get("x509_pem_cert") or []
            if not presented:
                raise errors.InvalidRequestError("renewal needs the mutual-TLS channel and its certificate")
            certificate, renew_after_ms = await self.fleet.devices.renew_certificate(
                principal.id, bytes(presented[0]), request.csr_pem
            )
            return device_pb2.RenewCertificateResponse(
                renewed=bool(certificate), certificate_pem=certificate, renew_after_unix_ms=renew_after_ms
            )

    async def Connect(self, request_iterator: AsyncIterator[device_pb2.DeviceMessage], context: Any) -> Any:
        principal = await self.auth.principal(context)
        device_id = principal.id
        streams = self.fleet.streams
        if (
            not streams.is_connected(device_id)
            and streams.connected_count() >= self.limits.max_connected_devices
        ):
            context.set_trailing_metadata((("retry-after-ms", "30000"),))
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "the server has all the devices it can hold"
            )
        # First, where the device's sequence must continue: a device that lost its state is not ignored as
        # stale, and one absurd number costs one round trip (edgefleet.v1.Hello). Sent at once, it also tells
        # the device that its stream is accepted.
        device = await self.fleet.devices.get(device_id)
        yield device_pb2.ServerMessage(hello=device_pb2.Hello(last_sequence=device.status_sequence))
        queue = streams.attach(device_id)
        reader = asyncio.create_task(self._read(device_id, request_iterator))
        getter: asyncio.Task[Push] = asyncio.create_task(queue.get())
        log.info("device %s connected", device_id)
        try:
            while True:
                if getter.done():
                    getter = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    push = getter.result()
                    if isinstance(push, Disconnect):
                        await context.abort(grpc.StatusCode.UNAVAILABLE, push.reason)
                    yield push_to_proto(push)
                    continue
                getter.cancel()
                async with status_for_errors(context):
                    reader.result()  # re-raises what ended the device's side
                return
        finally:
            getter.cancel()
            reader.cancel()
            streams.detach(device_id, queue)
            log.info("device %s disconnected", device_id)

    async def _read(self, device_id: str, messages: AsyncIterator[device_pb2.DeviceMessage]) -> None:
        async for message in messages:
            kind = message.WhichOneof("kind")
            if kind == "status":
                await self.fleet.devices.handle_status(device_id, convert.status_from_proto(message.status))
            elif kind == "event":
                await self.fleet.devices.handle_event(device_id, convert.event_from_proto(message.event))
            else:
                raise errors.InvalidRequestError("empty device message")

    async def ReportTelemetry(self, request: device_pb2.ReportTelemetryRequest, context: Any) -> Any:
        principal = await self.auth.principal(context)
        wait = self.telemetry_limit.take(principal.id)
        if wait:
            # Held before it is refused: a device ignoring the hint slows itself down, not the fleet.
            await asyncio.sleep(min(wait, 1.0))
            context.set_trailing_metadata((("retry-after-ms", str(int(wait * 1000) + 1)),))
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"telemetry rate limit: retry in {wait:.1f} s"
            )
        if self._telemetry_in_flight >= self.limits.telemetry_in_flight:
            context.set_trailing_metadata((("retry-after-ms", "1000"),))
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "the server is busy storing telemetry; retry"
            )
        self._telemetry_in_flight += 1
        try:
            async with status_for_errors(context):
                report = convert.telemetry_from_proto(request.report)
                await self.fleet.devices.handle_telemetry(principal.id, report)
                return device_pb2.ReportTelemetryResponse()
        finally:
            self._telemetry_in_flight -= 1

    async def GetAssignment(self, request: device_pb2.GetAssignmentRequest, context: Any) -> Any:
        principal = await self.auth.principal(context)
        async with status_for_errors(context):
            record, deployment_id, rollback = await self.fleet.devices.assignment_for(principal.id)
            response = device_pb2.GetAssignmentResponse(
                rollback_pending=bool(rollback),
                rollback_command_id=rollback,
                rollback_rollout_id=self.fleet.deployments.rollout_tag(rollback).rollout_id
                if rollback
                else "",
            )
            if record is not None:
                tag = self.fleet.deployments.rollout_tag(deployment_id)
                response.assignment.CopyFrom(
                    device_pb2.Assignment(
                        model=convert.ref_to_proto(record.ref()),
                        deployment_id=deployment_id,
                        shadow=tag.shadow,
                        rollout_id=tag.rollout_id,
                        retry=tag.retry,
                    )
                )
            return response

    async def GetMetadata(self, request: device_pb2.GetMetadataRequest, context: Any) -> Any:
        async with status_for_errors(context):
            check_name("metadata name", request.name)
            return device_pb2.GetMetadataResponse(
                content=await self.fleet.repository.get_metadata(request.name)
            )

    async def DownloadModel(self, request: device_pb2.DownloadModelRequest, context: Any) -> Any:
        # Flow control bounds what a slow or stuck reader pins (a few 64 KiB chunks); the per-device cap
        # bounds how many such calls one device can hold.
        principal = await self.auth.principal(context)
        if self._downloads.get(principal.id, 0) >= self.limits.downloads_per_device:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "too many downloads at once from this device"
            )
        self._downloads[principal.id] = self._downloads.get(principal.id, 0) + 1
        try:
            async with status_for_errors(context):
                repository = self.fleet.repository
                record = await repository.model_for_download(check_target_path(request.target_path))
                wire_length = int(record.details.get("wire_bytes") or record.length)
                if not 0 <= request.offset <= wire_length:
                    raise errors.InvalidRequestError(f"offset {request.offset} is outside 0..{wire_length}")
                chunks = repository.read_wire(record, request.offset, DOWNLOAD_CHUNK_BYTES)
                offset = request.offset
                while chunk := await asyncio.to_thread(next, chunks, b""):
                    yield device_pb2.DownloadModelResponse(
                        data=chunk, offset=offset, total_length=wire_length
                    )
                    offset += len(chunk)
        finally:
            self._downloads[principal.id] -= 1
            if not self._downloads[principal.id]:
                del self._downloads[principal.id]
