"""The operator service: what the CLI calls. Each handler checks the request's fields, calls the logic
(`Fleet.repository`, `.deployments`, `.devices`) and translates the answer to protobuf; errors become
status codes in `rpc_status.status_for_errors`. Only operator certificates reach it (`server.auth`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from edgefleet import convert, errors, labels
from edgefleet.audit_chain import AuditEntry
from edgefleet.server import audit
from edgefleet.server.audit import signing_keyids
from edgefleet.server.auth import Principal
from edgefleet.server.deployments import OPERATOR_ORDER, DeploymentStatus
from edgefleet.server.fleet import Fleet
from edgefleet.server.rpc_status import check_name, status_for_errors
from edgefleet.server.storage.records import DeviceRecord, EventRecord, ModelRecord
from edgefleet.v1 import operator_pb2, operator_pb2_grpc
from edgefleet.values import HealthSample, TelemetryReport

UPLOAD_CHUNK_LIMIT = 4 * 2**20
MAX_SIDE_FILE_BYTES = 64 * 2**20  # an eval or calibration set (compression.MAX_EVAL_BYTES)


def device_info(
    device: DeviceRecord, connected: bool, desired: ModelRecord | None
) -> operator_pb2.DeviceInfo:
    return operator_pb2.DeviceInfo(
        id=device.id,
        name=device.name,
        group=device.group,
        connected=connected,
        last_seen_unix_ms=device.last_seen_ms,
        current=convert.ref_to_proto(device.current),
        previous=convert.ref_to_proto(device.previous),
        desired=convert.ref_to_proto(desired.ref() if desired else None),
        last_stage=device.last_stage,
        last_reason=device.last_reason,
        capabilities=convert.capabilities_to_proto(device.capabilities),
        revoked=device.revoked,
        clock_skew_ms=device.clock_skew_ms,
        labels=dict(device.labels),
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


def model_info(m: ModelRecord) -> operator_pb2.ModelVersionInfo:
    return operator_pb2.ModelVersionInfo(
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


def telemetry_record(report: TelemetryReport) -> operator_pb2.TelemetryRecord:
    message = convert.telemetry_to_proto(report)
    record = operator_pb2.TelemetryRecord(at_unix_ms=report.at_ms, dropped_reports=report.dropped_reports)
    if report.health != HealthSample():  # a report without health figures answers without them
        record.health.CopyFrom(message.health)
    record.inference.extend(message.inference)
    return record


def event_info(e: EventRecord) -> operator_pb2.DeviceEvent:
    return operator_pb2.DeviceEvent(
        device_id=e.device_id, target_path=e.target_path, stage=e.stage, reason=e.reason, at_unix_ms=e.at_ms
    )


async def _side_file(
    messages: AsyncIterator[operator_pb2.UploadModelRequest], header: Any, what: str
) -> bytes:
    """The eval or calibration set of an upload: inline in the header, or `<what>_length` bytes in
    `<what>_chunk` messages that follow it. Raises InvalidRequestError saying what is wrong."""
    inline, length = bytes(getattr(header, f"{what}_npz")), int(getattr(header, f"{what}_length"))
    if inline and length:
        raise errors.InvalidRequestError(f"send the {what} set inline or in chunks, not both")
    if not 0 <= length <= MAX_SIDE_FILE_BYTES:
        raise errors.InvalidRequestError(
            f"the {what} set is {length} bytes; the limit is {MAX_SIDE_FILE_BYTES}: send fewer rows"
        )
    data = bytearray(inline)
    while len(data) < length:
        message = await anext(messages, None)
        if message is None or message.WhichOneof("kind") != f"{what}_chunk":
            raise errors.InvalidRequestError(
                f"the {what} set ended at {len(data)} of the {length} bytes the header declared"
            )
        chunk = getattr(message, f"{what}_chunk")
        if len(chunk) > UPLOAD_CHUNK_LIMIT or len(data) + len(chunk) > length:
            raise errors.InvalidRequestError(
                f"{what} chunks are limited to {UPLOAD_CHUNK_LIMIT} bytes and to the declared {length} in all"
            )
        data += chunk
    return bytes(data)


AUDIT_ANSWER_BYTES = 4 * 2**20  # well under the server's message limit, whatever the entries hold


def _within_budget(entries: list[operator_pb2.AuditEntry], oldest: bool) -> list[operator_pb2.AuditEntry]:
    """The entries that fit AUDIT_ANSWER_BYTES: the oldest when paging forward, else the newest. The
    client pages on from the last seq it got."""
    kept: list[operator_pb2.AuditEntry] = []
    size = 0
    for entry in entries if oldest else reversed(entries):
        size += entry.ByteSize()
        if size > AUDIT_ANSWER_BYTES and kept:
            break
        kept.append(entry)
    return kept if oldest else kept[::-1]


def audit_entry_info(entry: AuditEntry) -> operator_pb2.AuditEntry:
    return operator_pb2.AuditEntry(
        seq=entry.seq,
        at_unix_ms=entry.at_ms,
        actor=entry.actor,
        action=entry.action,
        subject=entry.subject,
        details_json=entry.details_json,
        previous_sha256=entry.previous_sha256,
        sha256=entry.sha256,
    )


class OperatorServicer(operator_pb2_grpc.OperatorServiceServicer):
    def __init__(
        self,
        fleet: Fleet,
        on_revoke: Callable[[], None] = lambda: None,
        principal: Callable[[Any], Awaitable[Principal]] | None = None,
    ):
        self.fleet = fleet
        self.on_revoke = on_revoke  # drops cached credentials so a revocation takes effect at once
        self.principal = principal  # who is calling (server.auth), for the audit log

    async def _audit(self, context: Any, action: str, subject: str, details: dict[str, Any]) -> None:
        """Records a successful operator action under the caller's certificate name."""
        actor = (await self.principal(context)).id if self.principal else "unknown"
        await self.fleet.audit.record(actor, action, subject, details)

    async def CreateEnrollmentToken(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            check_name("group", request.group, optional=True)
            group, uses, ttl = request.group or "default", request.uses or 1, request.ttl_seconds or 7 * 86400
            token, expires = await self.fleet.devices.create_enrollment_token(
                group, uses, ttl, dict(request.labels)
            )
            details = {
                "uses": uses,
                "ttl_seconds": ttl,
                "expires_at_ms": expires,
                "labels": dict(request.labels),
            }
            await self._audit(context, audit.TOKEN_CREATE, group, details)  # never the token itself
            return operator_pb2.CreateEnrollmentTokenResponse(token=token, expires_at_unix_ms=expires)

    async def UploadModel(
        self, request_iterator: AsyncIterator[operator_pb2.UploadModelRequest], context: Any
    ) -> Any:
        async with status_for_errors(context):
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("kind") != "header":
                raise errors.InvalidRequestError("an upload starts with a header message")
            header = first.header
            messages = aiter(request_iterator)
            eval_npz = await _side_file(messages, header, "eval")
            calibration_npz = await _side_file(messages, header, "calibration")

            async def chunks() -> AsyncIterator[bytes]:
                async for message in messages:
                    if message.WhichOneof("kind") != "chunk":
                        raise errors.InvalidRequestError(
                            "after the header come the eval chunks, the calibration chunks, then the "
                            "model's chunks"
                        )
                    if len(message.chunk) > UPLOAD_CHUNK_LIMIT:
                        raise errors.InvalidRequestError(f"chunks are limited to {UPLOAD_CHUNK_LIMIT} bytes")
                    yield message.chunk

            repository = self.fleet.repository
            already = any(m.version == header.version for m in await repository.list_models(header.name))
            records = await repository.upload_model(
                header.name,
                header.version,
                header.length,
                header.sha256,
                chunks(),
                eval_npz=eval_npz,
                calibration_npz=calibration_npz,
                tolerance_points=header.tolerance_points or 1.0,
                measure_without_eval=header.measure_without_eval,
            )
            original = records[0]
            variants = [{"variant": r.variant, "sha256": r.sha256, "length": r.length} for r in records]
            details = {
                "model": header.name,
                "version": header.version,
                "sha256": original.sha256,
                "length": original.length,
                "already_pushed": already,
                "with_eval_set": bool(header.eval_npz),
                "variants": variants,
            }
            await self._audit(context, audit.MODEL_PUSH, original.target_path, details)
            return operator_pb2.UploadModelResponse(
                target_path=original.target_path,
                sha256=original.sha256,
                length=original.length,
                inputs=[operator_pb2.TensorSpec(**t) for t in original.signature["inputs"]],
                outputs=[operator_pb2.TensorSpec(**t) for t in original.signature["outputs"]],
                validated_with=repository.validate_runtime,
                variants=[variant_info(r) for r in records],
                already_pushed=already,
                original_golden_npz=await asyncio.to_thread(repository.read_golden, original),
            )

    async def GetSignedMetadata(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            if request.name not in ("root", "targets"):
                raise errors.InvalidRequestError("ask for 'root' or 'targets'")
            content = await self.fleet.repository.current_metadata(request.name)
            return operator_pb2.GetSignedMetadataResponse(content=content)

    async def PublishTargets(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            before = await self._published_targets()
            versions = await self.fleet.repository.publish_targets(request.targets_json)
            signed_by, before_by = signing_keyids(request.targets_json), signing_keyids(before)
            targets = sorted(json.loads(request.targets_json)["signed"]["targets"])
            details = {
                "targets_version": versions.targets,
                "snapshot_version": versions.snapshot,
                "timestamp_version": versions.timestamp,
                "root_version": versions.root,
                "signed_by": signed_by,
                "target_files": len(targets),
                "targets": targets[:100],
            }
            await self._audit(context, audit.TARGETS_PUBLISH, f"targets v{versions.targets}", details)
            if before and signed_by != before_by:  # the targets key was changed (under a new root)
                change = {
                    "role": "targets",
                    "before": before_by,
                    "after": signed_by,
                    "root_version": versions.root,
                }
                await self._audit(context, audit.KEYS_CHANGE, f"targets v{versions.targets}", change)
            return operator_pb2.PublishTargetsResponse(
                targets_version=versions.targets,
                snapshot_version=versions.snapshot,
                timestamp_version=versions.timestamp,
            )

    async def _published_targets(self) -> bytes:
        try:
            return await self.fleet.repository.current_metadata("targets")
        except errors.NotFoundError:
            return b""  # nothing published yet

    async def ListModels(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            name = check_name("model name", request.name, optional=True)
            models = await self.fleet.repository.list_models(name)
            return operator_pb2.ListModelsResponse(models=[model_info(m) for m in models])

    async def CreateDeployment(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            # An empty model name would match every model's versions (list_models("") lists all).
            check_name("model name", request.model_name)
            check_name("version", request.version)
            check_name("variant", request.variant, optional=True)
            status = await self.fleet.deployments.deploy(
                request.model_name,
                request.version,
                request.selector,
                request.variant,
                validate_only=request.validate_only,
                allow_empty=request.allow_empty,
            )
            if not request.validate_only:
                d = status.deployment
                details = {
                    "model": d.model_name,
                    "version": d.version,
                    "selector": d.selector,
                    "variant": d.variant,
                    "allow_empty": request.allow_empty,
                    "targeted": status.targeted,
                    "notified": status.notified,
                    "unassigned": status.unassigned[:100],
                }
                await self._audit(context, audit.DEPLOYMENT_CREATE, d.id, details)
            return operator_pb2.CreateDeploymentResponse(deployment=deployment_info(status))

    async def ListDeployments(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            statuses = await self.fleet.deployments.deployment_statuses()
            return operator_pb2.ListDeploymentsResponse(deployments=[deployment_info(s) for s in statuses])

    async def RollbackDevices(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            result = await self.fleet.deployments.rollback(
                request.selector, request.reason or OPERATOR_ORDER, validate_only=request.validate_only
            )
            if not request.validate_only:
                actor = (await self.principal(context)).id if self.principal else "unknown"
                # A running rollout would send its later waves the candidate again: it waits for the operator.
                paused = await self.fleet.rollouts.hold_for_rollback(actor, result.devices, result.command_id)
                details = {
                    "selector": request.selector,
                    "reason": request.reason or OPERATOR_ORDER,
                    "targeted": result.targeted,
                    "notified": result.notified,
                    "skipped": result.skipped[:100],
                    "paused_rollouts": paused,
                }
                await self._audit(context, audit.DEPLOYMENT_ROLLBACK, result.command_id, details)
            return operator_pb2.RollbackDevicesResponse(
                command_id=result.command_id,
                devices_targeted=result.targeted,
                devices_notified=result.notified,
                skipped=result.skipped,
            )

    async def ListDevices(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            devices = await self.fleet.devices.list_devices(request.selector)
            models = {m.target_path: m for m in await self.fleet.repository.list_models()}
            connected = self.fleet.streams.is_connected
            return operator_pb2.ListDevicesResponse(
                devices=[device_info(d, connected(d.id), models.get(d.desired_target)) for d in devices]
            )

    async def RevokeDevice(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            device_id = await self.fleet.devices.revoke(check_name("device id", request.device_id))
            self.on_revoke()
            await self._audit(context, audit.DEVICE_REVOKE, device_id, {"asked_as": request.device_id})
            return operator_pb2.RevokeDeviceResponse()

    async def LabelDevice(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            check_name("device id", request.device_id)
            if len(request.set) + len(request.remove) > 2 * labels.MAX_LABELS:
                raise errors.InvalidRequestError(f"at most {2 * labels.MAX_LABELS} label changes at once")
            for key in [*request.set, *request.remove]:
                labels.check_key(key)  # before they become words: a key holding '=' is no key
            # The CLI's own words (key=value, key-), so the server refuses exactly what `devices label` would.
            words = [f"{k}={v}" for k, v in request.set.items()] + [f"{k}-" for k in request.remove]
            change = labels.edits(words)
            before, after = await self.fleet.devices.label(request.device_id, change, request.overwrite)
            details = {
                "before": dict(before.labels),
                "after": after,
                "set": dict(change.set),
                "removed": list(change.remove),
                "overwrite": request.overwrite,
            }
            await self._audit(context, audit.DEVICE_LABEL, before.id, details)
            return operator_pb2.LabelDeviceResponse(device_id=before.id, labels=after)

    async def ListAudit(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            page = await self.fleet.audit.entries(
                request.since_unix_ms, request.action, request.from_seq, request.limit
            )
            return operator_pb2.ListAuditResponse(
                entries=_within_budget([audit_entry_info(e) for e in page.entries], bool(request.from_seq)),
                head_seq=page.head_seq,
                head_sha256=page.head_sha256,
            )

    async def GetTelemetry(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            check_name("device id", request.device_id)
            if request.limit < 0:
                raise errors.InvalidRequestError("limit must not be negative")
            reports = await self.fleet.devices.telemetry(request.device_id, request.limit or 20)
            return operator_pb2.GetTelemetryResponse(records=[telemetry_record(r) for r in reports])

    async def ListEvents(self, request: Any, context: Any) -> Any:
        async with status_for_errors(context):
            check_name("device id", request.device_id, optional=True)
            if request.limit < 0:
                raise errors.InvalidRequestError("limit must not be negative")
            events = await self.fleet.devices.events(request.device_id, request.limit or 100)
            return operator_pb2.ListEventsResponse(events=[event_info(e) for e in events])
