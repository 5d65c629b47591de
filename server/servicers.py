"""gRPC servicers: translate protobuf <-> `server.fleet` calls, and edgefleet errors -> status codes.

No logic lives here beyond checking that requests are well formed; the authorization gate is
`server.auth.AuthInterceptor`, and the caller's identity comes from `Authenticator.principal`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from edgefleet.server.auth import Authenticator
from edgefleet.server.fleet import AssignmentPush, DeploymentStatus, Disconnect, Fleet, Push, RollbackPush
from edgefleet.server.limits import RateLimiter
from edgefleet.server.storage import DeviceRecord, ModelRecord, now_ms
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError

from edgefleet import errors, pki, selectors
from edgefleet.tensors import ref_from_dict, ref_to_dict
from edgefleet.v1 import common_pb2, device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc

log = logging.getLogger("edgefleet.server")

_STATUS = (
    (errors.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.AccessDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.SignatureError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.IncompatibleError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ArtifactError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.MetadataError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.TransportError, grpc.StatusCode.UNAVAILABLE),
)

DOWNLOAD_CHUNK_BYTES = 64 * 1024  # what a stuck reader pins in server memory is a few of these
UPLOAD_CHUNK_LIMIT = 4 * 2**20
# Error messages quote what the caller sent; unbounded, one can exceed the caller's metadata limit (8 KiB by
# default) and turn a clear INVALID_ARGUMENT into a client-side RESOURCE_EXHAUSTED.
MAX_DETAILS = 1000
# Times devices send, in ms since 1970; 0 = not set (the server's clock is used). A clock a year off is skew
# to report; a negative time or one more than ten years ahead is not a time.
MAX_AHEAD_MS = 10 * 365 * 86_400_000


@contextlib.asynccontextmanager
async def status_for_errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Our errors become their status code with their message; anything else is INTERNAL, logged in full."""
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except DecodeError:
        # A request stream's elements are parsed as the handler reads them, so a malformed one surfaces
        # here: the caller's error, not the server's.
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request message")
    except errors.EdgefleetError as e:
        details = str(e) if len(str(e)) <= MAX_DETAILS else str(e)[:MAX_DETAILS] + "..."
        for kind, code in _STATUS:
            if isinstance(e, kind):
                await context.abort(code, details)
        await context.abort(grpc.StatusCode.INTERNAL, details)
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception:
        log.exception("unexpected error")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")


# ---- checks ----------------------------------------------------------------------------------------------


def check_name(what: str, value: str, *, optional: bool = False) -> str:
    """`selectors.check_name`, where `optional` lets an empty value through."""
    if optional and not value:
        return value
    return selectors.check_name(what, value)


def check_target_path(path: str) -> str:
    """A repository file: "/"-separated plain names ("digits/2/float32.tflite"), never empty, absolute or
    with "." / ".." segments."""
    if not 0 < len(path) <= 512:
        raise errors.InvalidRequestError("target path must be 1..512 characters")
    for part in path.split("/"):
        check_name("target path segment", part)
    return path


def check_time(what: str, at_ms: int) -> int:
    if not 0 <= at_ms <= now_ms() + MAX_AHEAD_MS:
        raise errors.InvalidRequestError(f"{what} {at_ms} is not a time in ms since 1970")
    return at_ms


# ---- conversions -----------------------------------------------------------------------------------------


def ref_of(record: ModelRecord) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(
        target_path=record.target_path,
        model_name=record.name,
        version=record.version,
        variant=record.variant,
        sha256=record.sha256,
        length=record.length,
    )


def capabilities_to_dict(caps: common_pb2.Capabilities) -> dict[str, Any]:
    data = MessageToDict(caps, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for key in ("memory_total_bytes", "memory_available_bytes", "disk_free_bytes"):
        data[key] = int(data.get(key, 0))
        if data[key] < 0:
            raise errors.InvalidRequestError(f"capabilities.{key} is negative")
    if caps.cpu_count < 0:
        raise errors.InvalidRequestError("capabilities.cpu_count is negative")
    if not math.isfinite(caps.latency_budget_ms) or caps.latency_budget_ms < 0:
        raise errors.InvalidRequestError("capabilities.latency_budget_ms must be a finite number >= 0")
    # Stored with the device and returned by ListDevices: one device must not be able to make that answer
    # larger than a client accepts (4 MiB by default).
    for key in ("runtime", "runtime_version", "cpu_arch", "hardware_class"):
        if len(getattr(caps, key)) > 128:
            raise errors.InvalidRequestError(f"capabilities.{key} is longer than 128 characters")
    if len(caps.accelerators) > 32 or any(len(a) > 128 for a in caps.accelerators):
        raise errors.InvalidRequestError("too many accelerators, or too long names")
    return data


def capabilities_from_dict(data: dict[str, Any]) -> common_pb2.Capabilities:
    fields = common_pb2.Capabilities.DESCRIPTOR.fields_by_name
    return common_pb2.Capabilities(**{k: v for k, v in (data or {}).items() if k in fields})


def telemetry_to_dict(report: device_pb2.TelemetryReport) -> dict[str, Any]:
    """Refuses NaN/infinite figures, negative counts and oversized histograms."""
    health = report.health
    figures = [health.cpu_percent, health.uptime_seconds]
    if health.HasField("temperature_celsius"):
        figures.append(health.temperature_celsius)
    for stats in report.inference:
        if len(stats.target_path) > 512:
            raise errors.InvalidRequestError("telemetry target path is too long")
        figures += [stats.latency_sum_ms, stats.latency_max_ms, *stats.latency_bounds_ms]
        if stats.count < 0 or stats.errors < 0 or any(c < 0 for c in stats.latency_counts):
            raise errors.InvalidRequestError("telemetry counts must not be negative")
        if len(stats.latency_bounds_ms) > 64 or len(stats.latency_counts) > 65:
            raise errors.InvalidRequestError("telemetry histogram has too many buckets")
    if not all(math.isfinite(f) for f in figures):
        raise errors.InvalidRequestError("telemetry figures must be finite numbers")
    counts = (health.memory_used_bytes, health.memory_total_bytes, health.disk_free_bytes)
    if report.dropped_reports < 0 or any(c < 0 for c in counts):
        raise errors.InvalidRequestError("telemetry counts must not be negative")
    check_time("telemetry at_unix_ms", report.at_unix_ms)
    if len(report.inference) > 64:
        raise errors.InvalidRequestError("telemetry has too many model versions")
    data = MessageToDict(report, preserving_proto_field_name=True)
    data["at_ms"] = int(data.pop("at_unix_ms", 0))
    return data


def push_to_proto(push: Push) -> device_pb2.ServerMessage:
    if isinstance(push, AssignmentPush):
        return device_pb2.ServerMessage(
            assignment=device_pb2.Assignment(model=ref_of(push.model), deployment_id=push.deployment_id)
        )
    assert isinstance(push, RollbackPush)
    return device_pb2.ServerMessage(
        rollback=device_pb2.RollbackCommand(command_id=push.command_id, reason=push.reason)
    )


def device_info(
    device: DeviceRecord, connected: bool, desired: ModelRecord | None
) -> operator_pb2.DeviceInfo:
    return operator_pb2.DeviceInfo(
        id=device.id,
        name=device.name,
        group=device.group,
        connected=connected,
        last_seen_unix_ms=device.last_seen_ms,
        current=ref_from_dict(device.current),
        previous=ref_from_dict(device.previous),
        desired=ref_of(desired) if desired else common_pb2.ModelRef(),
        last_stage=device.last_stage,
        last_reason=device.last_reason,
        capabilities=capabilities_from_dict(device.capabilities),
        revoked=device.revoked,
        clock_skew_ms=device.clock_skew_ms,
    )


def deployment_info(status: DeploymentStatus) -> operator_pb2.DeploymentInfo:
    d = status.deployment
    return operator_pb2.DeploymentInfo(
        id=d.id,
        model_name=d.model_name,
        version=d.version,
        selector=d.selector,
        created_at_unix_ms=d.created_ms,
        devices_targeted=status.targeted,
        devices_healthy=status.healthy,
        devices_failed=status.failed,
        devices_pending=status.pending,
        devices_superseded=status.superseded,
        devices_notified=status.notified,
        variant=d.variant,
        unassigned=status.unassigned,
        choices=status.choices,
        kind=d.kind,
    )


def variant_info(record: ModelRecord) -> operator_pb2.VariantInfo:
    return operator_pb2.VariantInfo(
        target_path=record.target_path,
        variant=record.variant,
        sha256=record.sha256,
        length=record.length,
        details_json=json.dumps(record.details, sort_keys=True),
    )


# ---- device service --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceLimits:
    """What one device, and all of them together, may hold of the server at once."""

    max_connected_devices: int = 50_000
    downloads_per_device: int = 2
    telemetry_in_flight: int = 64  # reports being stored at once, fleet-wide; more are told to retry


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
                device, secret, certificate = await self.fleet.enroll(
                    request.enrollment_token,
                    request.device_name,
                    capabilities_to_dict(request.capabilities),
                    request.csr_pem,
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

    async def Connect(self, request_iterator: AsyncIterator[device_pb2.DeviceMessage], context: Any) -> Any:
        principal = await self.auth.principal(context)
        device_id = principal.id
        if (
            not self.fleet.is_connected(device_id)
            and self.fleet.connected_count() >= self.limits.max_connected_devices
        ):
            context.set_trailing_metadata((("retry-after-ms", "30000"),))
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "the server has all the devices it can hold"
            )
        queue = self.fleet.attach(device_id)
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
            self.fleet.detach(device_id, queue)
            log.info("device %s disconnected", device_id)

    async def _read(self, device_id: str, messages: AsyncIterator[device_pb2.DeviceMessage]) -> None:
        async for message in messages:
            kind = message.WhichOneof("kind")
            if kind == "status":
                s = message.status
                if s.sequence >= 2**63:  # stored as a signed 64-bit integer
                    raise errors.InvalidRequestError("status sequence is out of range")
                await self.fleet.handle_status(
                    device_id,
                    {
                        "current": ref_to_dict(s.current),
                        "previous": ref_to_dict(s.previous),
                        "capabilities": capabilities_to_dict(s.capabilities)
                        if s.HasField("capabilities")
                        else None,
                        "bad_targets": [t[:512] for t in s.bad_targets[:256]],
                        "sent_at_ms": check_time("status sent_at_unix_ms", s.sent_at_unix_ms),
                        "sequence": s.sequence,
                    },
                )
            elif kind == "event":
                e = message.event
                await self.fleet.handle_event(
                    device_id,
                    {
                        "target_path": e.target_path,
                        "stage": common_pb2.UpdateStage.Name(e.stage).removeprefix("UPDATE_STAGE_").lower()
                        if e.stage in common_pb2.UpdateStage.values()
                        else "",
                        "reason": e.reason,
                        "at_ms": check_time("event at_unix_ms", e.at_unix_ms),
                        "command_id": e.command_id,
                    },
                )
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
                await self.fleet.handle_telemetry(principal.id, telemetry_to_dict(request.report))
                return device_pb2.ReportTelemetryResponse()
        finally:
            self._telemetry_in_flight -= 1

    async def GetAssignment(self, request: device_pb2.GetAssignmentRequest, context: Any) -> Any:
        principal = await self.auth.principal(context)
        async with status_for_errors(context):
            record, deployment_id, rollback = await self.fleet.assignment_for(principal.id)
            response = device_pb2.GetAssignmentResponse(
                rollback_pending=bool(rollback), rollback_command_id=rollback
            )
            if record is not None:
                response.assignment.CopyFrom(
                    device_pb2.Assignment(model=ref_of(record), deployment_id=deployment_id)
                )
            return response

    async def GetMetadata(self, request: device_pb2.GetMetadataRequest, context: Any) -> Any:
        async with status_for_errors(context):
            check_name("metadata name", request.name)
            return device_pb2.GetMetadataResponse(content=await self.fleet.get_metadata(request.name))

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
                record = await self.fleet.model_for_download(check_target_path(request.target_path))
                wire_length = int(record.details.get("wire_bytes") or record.length)
                if not 0 <= request.offset <= wire_length:
                    raise errors.InvalidRequestError(f"offset {request.offset} is outside 0..{wire_length}")
                chunks = self.fleet.read_wire(record, request.offset, DOWNLOAD_CHUNK_BYTES)
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


# ---- operator service ------------------------------------------------------------------------------------


class OperatorServicer(operator_pb2_grpc.OperatorServiceServicer):
    def __init__(self, fleet: Fleet, on_revoke: Callable[[], None] = lambda: None):
        self.fleet = fleet
        self.on_revoke = on_revoke  # drops cached credentials so a revocation takes effect at once

    async def CreateEnrollmentToken(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            check_name("group", request.group, optional=True)
            token, expires = await self.fleet.create_enrollment_token(
                request.group or "default", request.uses or 1, request.ttl_seconds or 7 * 86400
            )
            return operator_pb2.CreateEnrollmentTokenResponse(token=token, expires_at_unix_ms=expires)

    async def UploadModel(
        self, request_iterator: AsyncIterator[operator_pb2.UploadModelRequest], context: Any
    ) -> Any:
        async with status_for_errors(context):
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("kind") != "header":
                raise errors.InvalidRequestError("an upload starts with a header message")
            header = first.header

            async def chunks() -> AsyncIterator[bytes]:
                async for message in request_iterator:
                    if message.WhichOneof("kind") != "chunk":
                        raise errors.InvalidRequestError("only chunks may follow the header")
                    if len(message.chunk) > UPLOAD_CHUNK_LIMIT:
                        raise errors.InvalidRequestError(f"chunks are limited to {UPLOAD_CHUNK_LIMIT} bytes")
                    yield message.chunk

            records = await self.fleet.upload_model(
                header.name,
                header.version,
                header.length,
                header.sha256,
                chunks(),
                eval_npz=header.eval_npz,
                calibration_npz=header.calibration_npz,
                tolerance_points=header.tolerance_points or 1.0,
            )
            original = records[0]
            return operator_pb2.UploadModelResponse(
                target_path=original.target_path,
                sha256=original.sha256,
                length=original.length,
                inputs=[operator_pb2.TensorSpec(**t) for t in original.signature["inputs"]],
                outputs=[operator_pb2.TensorSpec(**t) for t in original.signature["outputs"]],
                validated_with=self.fleet.validate_runtime,
                variants=[variant_info(r) for r in records],
            )

    async def GetSignedMetadata(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            if request.name not in ("root", "targets"):
                raise errors.InvalidRequestError("ask for 'root' or 'targets'")
            return operator_pb2.GetSignedMetadataResponse(
                content=await self.fleet.current_metadata(request.name)
            )

    async def PublishTargets(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            versions = await self.fleet.publish_targets(request.targets_json)
            return operator_pb2.PublishTargetsResponse(
                targets_version=versions.targets,
                snapshot_version=versions.snapshot,
                timestamp_version=versions.timestamp,
            )

    async def ListModels(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            models = await self.fleet.list_models(check_name("model name", request.name, optional=True))
            return operator_pb2.ListModelsResponse(
                models=[
                    operator_pb2.ModelVersionInfo(
                        name=m.name,
                        version=m.version,
                        variant=m.variant,
                        target_path=m.target_path,
                        sha256=m.sha256,
                        length=m.length,
                        signed=m.signed,
                        created_at_unix_ms=m.created_ms,
                        details_json=json.dumps(m.details, sort_keys=True),
                    )
                    for m in models
                ]
            )

    async def CreateDeployment(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            # An empty model name would match every model's versions (list_models("") lists all).
            check_name("model name", request.model_name)
            check_name("version", request.version)
            check_name("variant", request.variant, optional=True)
            status = await self.fleet.deploy(
                request.model_name, request.version, request.selector, request.variant
            )
            return operator_pb2.CreateDeploymentResponse(deployment=deployment_info(status))

    async def ListDeployments(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            statuses = await self.fleet.deployment_statuses()
            return operator_pb2.ListDeploymentsResponse(deployments=[deployment_info(s) for s in statuses])

    async def RollbackDevices(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            result = await self.fleet.rollback(request.selector, request.reason or "ordered by an operator")
            return operator_pb2.RollbackDevicesResponse(
                command_id=result.command_id,
                devices_targeted=result.targeted,
                devices_notified=result.notified,
                skipped=result.skipped,
            )

    async def ListDevices(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            devices = await self.fleet.list_devices(request.selector)
            models = {m.target_path: m for m in await self.fleet.list_models()}
            return operator_pb2.ListDevicesResponse(
                devices=[
                    device_info(d, self.fleet.is_connected(d.id), models.get(d.desired_target))
                    for d in devices
                ]
            )

    async def RevokeDevice(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            await self.fleet.revoke(check_name("device id", request.device_id))
            self.on_revoke()
            return operator_pb2.RevokeDeviceResponse()

    async def GetTelemetry(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            check_name("device id", request.device_id)
            if request.limit < 0:
                raise errors.InvalidRequestError("limit must not be negative")
            records = await self.fleet.telemetry(request.device_id, request.limit or 20)
            response = operator_pb2.GetTelemetryResponse()
            for at_ms, report in records:
                record = response.records.add(
                    at_unix_ms=at_ms, dropped_reports=int(report.get("dropped_reports", 0))
                )
                if "health" in report:
                    record.health.CopyFrom(_parse(report["health"], common_pb2.HealthSample()))
                for stats in report.get("inference", []):
                    record.inference.append(_parse(stats, common_pb2.InferenceStats()))
            return response

    async def ListEvents(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            check_name("device id", request.device_id, optional=True)
            if request.limit < 0:
                raise errors.InvalidRequestError("limit must not be negative")
            events = await self.fleet.events(request.device_id, request.limit or 100)
            return operator_pb2.ListEventsResponse(
                events=[
                    operator_pb2.DeviceEvent(
                        device_id=e.device_id,
                        target_path=e.target_path,
                        stage=e.stage,
                        reason=e.reason,
                        at_unix_ms=e.at_ms,
                    )
                    for e in events
                ]
            )


def _parse(data: dict[str, Any], message: Any) -> Any:
    from google.protobuf.json_format import ParseDict

    return ParseDict(data, message, ignore_unknown_fields=True)
