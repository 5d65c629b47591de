"""The fleet server's logic: models, the signed repository, deployments, rollbacks and what devices report.

It never imports grpc: the servicers (`server.servicers`) translate protobuf to the calls here and the
errors raised here (edgefleet.errors) to status codes. Storage calls are blocking and run in threads.

Data flow of an update:
    operator  UploadModel -> blob + ModelRecord (unsigned) -> PublishTargets (operator-signed targets.json)
              -> snapshot + timestamp (online key) -> CreateDeployment -> desired target per device
    device    Connect: status (truth) -> the server pushes Assignment / RollbackCommand at once
              -> GetMetadata + DownloadModel -> events: downloaded, verified, activated, healthy / failed
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from edgefleet.server.storage import (
    BlobStore,
    Deployment,
    DeviceRecord,
    EventRecord,
    FleetStore,
    ModelRecord,
    RepoVersions,
    now_ms,
)
from edgefleet.server.variants import choose, choose_target

from edgefleet import pki, sandbox, signing
from edgefleet.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    SignatureError,
)
from edgefleet.modelinfo import describe_file, inspect_model
from edgefleet.selectors import Selector, check_name, parse_selector

log = logging.getLogger("edgefleet.server")

ORIGINAL_VARIANT = "float32"
_METADATA_NAME = re.compile(r"root|timestamp|[1-9][0-9]{0,8}\.(root|snapshot|targets)")  # fullmatch
CLOCK_SKEW_WARNING_MS = 5 * 60 * 1000
STAGES = ("downloading", "downloaded", "verified", "activated", "healthy", "failed", "rolled_back")


def target_path(name: str, version: str, variant: str = ORIGINAL_VARIANT) -> str:
    return f"{name}/{version}/{variant}.tflite"


def describe_upload(
    content: bytes, eval_npz: bytes, calibration_npz: bytes, tolerance: float, validate_runtime: str
) -> list[tuple[str, bytes, dict[str, Any], dict[str, Any], bytes]]:
    """In the sandbox: (variant, model bytes, tensor signature, measured details, wire bytes) for the upload
    and, with an eval set, each compressed variant. Raises ModelError / InvalidRequestError."""
    signature = inspect_model(content, validate_runtime)
    if not eval_npz:
        return [
            (ORIGINAL_VARIANT, content, signature.to_json(), describe_file(content, original=None), content)
        ]
    from edgefleet.server import compression  # heavy (ai-edge-quantizer): only when compressing

    eval_set = compression.load_eval_npz(eval_npz)
    calibration = compression.load_eval_npz(calibration_npz).x if calibration_npz else None
    described = []
    for variant in compression.build_variants(
        content, eval_set, tolerance_points=tolerance, calibration=calibration
    ):
        details = dict(variant.details)
        details.update(describe_file(variant.model, original=content))
        described.append(
            (
                variant.name,
                variant.model,
                inspect_model(variant.model, validate_runtime).to_json(),
                details,
                variant.wire,
            )
        )
    return described


# ---- what the server pushes down a device's control stream ----------------------------------------------


@dataclass(frozen=True)
class AssignmentPush:
    model: ModelRecord
    deployment_id: str


@dataclass(frozen=True)
class RollbackPush:
    command_id: str
    reason: str


@dataclass(frozen=True)
class Disconnect:
    reason: str


Push = AssignmentPush | RollbackPush | Disconnect


@dataclass
class DeploymentStatus:
    deployment: Deployment
    targeted: int = 0
    healthy: int = 0
    failed: int = 0
    pending: int = 0
    superseded: int = 0  # targeted, since taken over by a later deployment or rollback
    notified: int = 0
    unassigned: list[str] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)


@dataclass
class RollbackResult:
    command_id: str
    targeted: int = 0
    notified: int = 0
    skipped: list[str] = field(default_factory=list)


class Fleet:
    def __init__(
        self,
        store: FleetStore,
        blobs: BlobStore,
        online: signing.OnlineRoles,
        trust_root: bytes,
        validate_runtime: str,
        max_model_bytes: int,
        ca: pki.CertificateAuthority | None = None,
        device_cert_days: float = 365,
        describe_timeout_s: float = 300,
        describe_memory_bytes: int = 8 * 2**30,
    ):
        self.describe_timeout_s = describe_timeout_s
        self.describe_memory_bytes = describe_memory_bytes
        self.ca = ca  # None: a plaintext local demo, devices get bearer tokens
        self.device_cert_days = device_cert_days
        self.store = store
        self.blobs = blobs
        self.online = online
        self.trust_root = trust_root
        self.validate_runtime = validate_runtime
        self.max_model_bytes = max_model_bytes
        self._streams: dict[str, asyncio.Queue[Push]] = {}

    async def _db(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    # ---- repository ------------------------------------------------------------------------------------

    async def init_repository(self) -> None:
        """First start: store root.json v1 and an empty timestamp. Later starts: check the root is the same."""
        versions: RepoVersions = await self._db(self.store.repo_versions)
        if versions.root == 0:
            files = {"1.root": self.trust_root, "root": self.trust_root}
            await self._db(self.store.put_metadata, files, RepoVersions(root=1), versions)
        elif await self._db(self.store.get_metadata, "1.root") != self.trust_root:
            raise SignatureError("this server's database was created with another root.json; use that one")

    async def renew_online_metadata(self, margin: timedelta = timedelta(hours=12)) -> bool:
        """Re-signs timestamp (and snapshot) before they expire, so devices never see stale metadata."""
        versions: RepoVersions = await self._db(self.store.repo_versions)
        if versions.targets == 0:
            return False
        soon = signing.utcnow() + margin
        ts = signing.expires_at(await self._db(self.store.get_metadata, "timestamp"))
        snap = signing.expires_at(await self._db(self.store.get_metadata, f"{versions.snapshot}.snapshot"))
        if ts > soon and snap > soon + timedelta(days=2):
            return False
        release = self.online.release(
            None,
            targets_version=versions.targets,
            snapshot_version=versions.snapshot,
            timestamp_version=versions.timestamp,
            renew_snapshot=snap <= soon + timedelta(days=2),
        )
        new = RepoVersions(
            versions.root, release.targets_version, release.snapshot_version, release.timestamp_version
        )
        await self._db(self.store.put_metadata, release.files, new, versions)
        return True

    async def current_metadata(self, role: str) -> bytes:
        """The newest root or targets metadata (for the operator to extend and sign)."""
        versions: RepoVersions = await self._db(self.store.repo_versions)
        version = versions.root if role == "root" else versions.targets
        if version == 0:
            raise NotFoundError(f"no {role} metadata published yet")
        return await self._db(self.store.get_metadata, f"{version}.{role}")

    async def get_metadata(self, name: str) -> bytes:
        if not _METADATA_NAME.fullmatch(name):
            raise InvalidRequestError(f"bad metadata name {name!r}")
        if name == "root":
            versions: RepoVersions = await self._db(self.store.repo_versions)
            name = f"{versions.root}.root"
        return await self._db(self.store.get_metadata, name)

    async def publish_targets(self, data: bytes) -> RepoVersions:
        """Accepts operator-signed targets.json whose every target is a file the server holds."""
        versions: RepoVersions = await self._db(self.store.repo_versions)
        md = self.online.check_targets(data, versions.targets)
        for path, target in md.signed.targets.items():
            record: ModelRecord = await self._db(self.store.get_model, path)
            if target.length != record.length or target.hashes.get("sha256") != record.sha256:
                raise InvalidRequestError(f"{path}: signed hash or length differs from the uploaded file")
        release = self.online.release(
            md,
            targets_version=versions.targets,
            snapshot_version=versions.snapshot,
            timestamp_version=versions.timestamp,
        )
        new = RepoVersions(
            versions.root, release.targets_version, release.snapshot_version, release.timestamp_version
        )
        await self._db(self.store.put_metadata, release.files, new, versions)
        await self._db(self.store.mark_signed, list(md.signed.targets))
        log.info("published targets v%d (%d files)", new.targets, len(md.signed.targets))
        return new

    # ---- models ----------------------------------------------------------------------------------------

    async def upload_model(
        self,
        name: str,
        version: str,
        length: int,
        sha256: str,
        chunks: AsyncIterator[bytes],
        *,
        eval_npz: bytes = b"",
        calibration_npz: bytes = b"",
        tolerance_points: float = 1.0,
    ) -> list[ModelRecord]:
        """Streams the file to the blob store, checks it against the header and that it loads, and (with an
        eval set) builds the compressed variants. Returns the original first, then the variants."""
        check_name("model name", name)
        check_name("version", version)
        if not 0 < length <= self.max_model_bytes:
            raise InvalidRequestError(f"model length {length} is outside 1..{self.max_model_bytes} bytes")
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise InvalidRequestError("header sha256 must be 64 lowercase hex digits")
        if not (0 < tolerance_points <= 100):
            raise InvalidRequestError("tolerance_points must be in (0, 100]")
        existing = [m for m in await self.list_models(name) if m.version == version]
        if existing:
            if existing[0].sha256 != sha256:
                raise ConflictError(
                    f"{name} {version} already exists with other content; versions are immutable, use a new version"
                )
            # Re-pushing the same bytes (e.g. after a failed signing step) is fine: nothing is redone.
            await self._drain(chunks)
            return sorted(existing, key=lambda m: m.variant != ORIGINAL_VARIANT)
        writer = self.blobs.begin_write()
        try:
            async for chunk in chunks:
                if writer.length + len(chunk) > length:
                    raise InvalidRequestError(f"upload is longer than the {length} bytes the header declared")
                await asyncio.to_thread(writer.write, chunk)
            if writer.length != length:
                raise InvalidRequestError(f"upload ended at {writer.length} of {length} bytes; push again")
            digest = await asyncio.to_thread(writer.commit, sha256)
        except BaseException:
            writer.abort()
            raise
        content = await asyncio.to_thread(self.blobs.path(digest).read_bytes)
        records = await asyncio.to_thread(
            self._describe, name, version, content, eval_npz, calibration_npz, tolerance_points
        )
        for record in records:
            await self._db(self.store.add_model, record)
        return records

    @staticmethod
    async def _drain(chunks: AsyncIterator[bytes]) -> None:
        async for _ in chunks:
            pass

    def _describe(
        self,
        name: str,
        version: str,
        content: bytes,
        eval_npz: bytes,
        calibration_npz: bytes,
        tolerance: float,
    ) -> list[ModelRecord]:
        """Blocking: validates and measures the upload (and builds its variants) in a sandboxed child
        process, since the interpreter must not see untrusted bytes inside the server. Runs in a thread."""
        described = sandbox.run(
            "edgefleet.server.fleet:describe_upload",
            content,
            eval_npz,
            calibration_npz,
            tolerance,
            self.validate_runtime,
            timeout=self.describe_timeout_s,
            memory_limit=self.describe_memory_bytes,
        )
        records = [
            self._record(name, version, variant, model, signature, details, wire)
            for variant, model, signature, details, wire in described
        ]
        records.sort(key=lambda r: r.variant != ORIGINAL_VARIANT)
        return records

    def _record(
        self,
        name: str,
        version: str,
        variant: str,
        model: bytes,
        signature: dict[str, Any],
        details: dict[str, Any],
        wire: bytes,
    ) -> ModelRecord:
        sha = self.blobs.put_bytes(model)
        if wire != model:
            details["wire_sha256"] = self.blobs.put_bytes(wire)
        else:
            details.setdefault("wire_encoding", "identity")
            details["wire_sha256"] = sha
        details["wire_bytes"] = len(wire)
        return ModelRecord(
            target_path(name, version, variant),
            name,
            version,
            variant,
            sha,
            len(model),
            signature,
            now_ms(),
            details=details,
        )

    async def list_models(self, name: str = "") -> list[ModelRecord]:
        return await self._db(self.store.list_models, name)

    async def signed_variants(self, name: str, version: str) -> list[ModelRecord]:
        models = [m for m in await self.list_models(name) if m.version == version]
        if not models:
            raise NotFoundError(f"no model {name} {version}; push it first (`edgefleet model push`)")
        signed = [m for m in models if m.signed]
        if not signed:
            raise ConflictError(
                f"{name} {version} is uploaded but not signed; run `edgefleet model push` again"
            )
        return signed

    def read_wire(self, record: ModelRecord, offset: int, chunk_size: int) -> Iterator[bytes]:
        """The bytes a device downloads (compressed when the signed metadata says so), from `offset`."""
        return self.blobs.read(record.details.get("wire_sha256") or record.sha256, offset, chunk_size)

    async def model_for_download(self, path: str) -> ModelRecord:
        record: ModelRecord = await self._db(self.store.get_model, path)
        if not record.signed:
            raise NotFoundError(f"{path} is not published")
        return record

    # ---- devices ---------------------------------------------------------------------------------------

    async def create_enrollment_token(self, group: str, uses: int, ttl_seconds: int) -> tuple[str, int]:
        check_name("group", group)
        if not 1 <= uses <= 100_000 or not 60 <= ttl_seconds <= 365 * 86400:
            raise InvalidRequestError("uses must be 1..100000 and ttl 60 s..365 days")
        expires = now_ms() + ttl_seconds * 1000
        return await self._db(self.store.create_enrollment_token, group, uses, expires), expires

    async def enroll(
        self, token: str, name: str, capabilities: dict[str, Any], csr_pem: bytes = b""
    ) -> tuple[DeviceRecord, str, bytes]:
        """Consumes the token; returns the device, its bearer secret (plaintext demo) and its certificate
        (TLS: issued for the CSR's key, with the device id the server chose as its name)."""
        check_name("device name", name)
        if self.ca is not None and not csr_pem:
            raise InvalidRequestError("enrollment needs a certificate signing request (csr_pem)")
        if self.ca is not None:
            pki.load_csr_checked(csr_pem)  # refuse a bad CSR before the token is spent
        device, secret = await self._db(self.store.enroll, token, name, capabilities)
        certificate = b""
        if self.ca is not None:
            certificate = pki.cert_pem(
                self.ca.sign_csr(csr_pem, device.id, pki.DEVICE, self.device_cert_days)
            )
        # A device that joins after a rollout started still gets it (latest matching deployment wins).
        for deployment in reversed(await self._db(self.store.list_deployments)):
            if deployment.kind == "deploy" and parse_selector(deployment.selector).matches(
                device.id, device.group
            ):
                target = await self._choose_target(deployment, device)
                if target:
                    await self._db(self.store.add_deployment_target, deployment.id, device.id, target)
                break
        log.info("enrolled %s (%s) in group %s", device.id, name, device.group)
        return device, secret, certificate

    async def revoke(self, device_id: str) -> None:
        await self._db(self.store.get_device, device_id)
        await self._db(self.store.update_device, device_id, revoked=True)
        queue = self._streams.pop(device_id, None)
        if queue is not None:
            queue.put_nowait(Disconnect("credentials revoked"))  # ends its control stream now
        log.warning("revoked device %s", device_id)

    async def device_status(self, key: str, by_token: bool) -> tuple[str, bool] | None:
        """(device id, revoked) for a device id or bearer token; None when unknown."""
        if by_token:
            device = await self._db(self.store.device_for_token, key)
        else:
            try:
                device = await self._db(self.store.get_device, key)
            except NotFoundError:
                return None
        return (device.id, device.revoked) if device else None

    async def device_for_token(self, token: str) -> DeviceRecord | None:
        return await self._db(self.store.device_for_token, token)

    def is_connected(self, device_id: str) -> bool:
        return device_id in self._streams

    def connected_count(self) -> int:
        return len(self._streams)

    def attach(self, device_id: str) -> asyncio.Queue[Push]:
        """A new control stream for the device; replaces (and thereby ends) an older one."""
        queue: asyncio.Queue[Push] = asyncio.Queue(maxsize=64)
        old = self._streams.get(device_id)
        if old is not None:
            old.put_nowait(Disconnect("replaced by a newer connection"))
        self._streams[device_id] = queue
        return queue

    def detach(self, device_id: str, queue: asyncio.Queue[Push]) -> None:
        if self._streams.get(device_id) is queue:
            del self._streams[device_id]

    def _push(self, device_id: str, push: Push) -> bool:
        queue = self._streams.get(device_id)
        if queue is None:
            return False
        try:
            queue.put_nowait(push)
        except asyncio.QueueFull:
            return False  # the device is not reading; it catches up from its status on reconnect
        return True

    async def handle_status(self, device_id: str, status: dict[str, Any]) -> None:
        """The device's truth about what it runs. A report whose sequence is not newer than the last one
        accepted is ignored (a replay or a reordering), whatever the device's clock says."""
        device: DeviceRecord = await self._db(self.store.get_device, device_id)
        sequence = int(status.get("sequence", 0))
        if sequence <= device.status_sequence:
            log.warning(
                "ignored a stale status report from %s (sequence %d <= %d)",
                device_id,
                sequence,
                device.status_sequence,
            )
            return
        skew = int(status.get("sent_at_ms", 0)) - now_ms() if status.get("sent_at_ms") else 0
        if abs(skew) > CLOCK_SKEW_WARNING_MS:
            log.warning(
                "device %s clock is off by %.0f s; its signed-metadata expiry checks will be wrong",
                device_id,
                skew / 1000,
            )
        await self._db(
            self.store.update_device,
            device_id,
            current=status.get("current"),
            previous=status.get("previous"),
            capabilities=status.get("capabilities") or device.capabilities,
            bad_targets=status.get("bad_targets", []),
            last_seen_ms=now_ms(),
            status_sequence=sequence,
            clock_skew_ms=skew,
        )
        await self.push_pending(device_id)

    async def push_pending(self, device_id: str) -> None:
        """Tells a connected device what it should do now, if anything."""
        await self._push_pending_to(await self._db(self.store.get_device, device_id))

    async def _push_pending_to(self, device: DeviceRecord, desired: ModelRecord | None = None) -> None:
        """`push_pending` for a record in hand; `desired` is the desired target's model when the caller has
        it (else it is read)."""
        current = (device.current or {}).get("target_path", "")
        if device.rollback_command and current != device.desired_target:
            self._push(device.id, RollbackPush(device.rollback_command, "ordered by an operator"))
        elif device.desired_target and device.desired_target != current:
            if device.desired_target in device.bad_targets:
                return  # the device already refused it; a new deployment is needed
            record = desired or await self._db(self.store.get_model, device.desired_target)
            self._push(device.id, AssignmentPush(record, device.desired_deployment))

    async def assignment_for(self, device_id: str) -> tuple[ModelRecord | None, str, str]:
        """For the periodic check: (desired model, deployment id, pending rollback command id)."""
        device: DeviceRecord = await self._db(self.store.get_device, device_id)
        await self._db(self.store.update_device, device_id, last_seen_ms=now_ms())
        record = None
        if device.desired_target:
            record = await self._db(self.store.get_model, device.desired_target)
        current = (device.current or {}).get("target_path", "")
        rollback = device.rollback_command if current != device.desired_target else ""
        return record, device.desired_deployment, rollback

    async def handle_event(self, device_id: str, event: dict[str, Any]) -> None:
        stage = event.get("stage", "")
        if stage not in STAGES:
            raise InvalidRequestError(f"unknown update stage {stage!r}")
        device: DeviceRecord = await self._db(self.store.get_device, device_id)
        record = EventRecord(
            device_id,
            str(event.get("target_path", ""))[:512],
            stage,
            str(event.get("reason", ""))[:2000],
            int(event.get("at_ms") or now_ms()),
            device.desired_deployment,
        )
        await self._db(self.store.add_event, record)
        fields: dict[str, Any] = {"last_stage": stage, "last_reason": record.reason, "last_seen_ms": now_ms()}
        if stage == "rolled_back" and event.get("command_id") == device.rollback_command:
            fields["rollback_command"] = ""
        await self._db(self.store.update_device, device_id, **fields)
        log.info("device %s: %s %s %s", device_id, stage, record.target_path, record.reason)

    async def handle_telemetry(self, device_id: str, report: dict[str, Any]) -> None:
        await self._db(self.store.add_telemetry, device_id, int(report.get("at_ms") or now_ms()), report)

    # ---- deployments and rollbacks ----------------------------------------------------------------------

    async def _choose_target(self, deployment: Deployment, device: DeviceRecord) -> str:
        variants = await self.signed_variants(deployment.model_name, deployment.version)
        return choose_target(variants, device.capabilities, device.bad_targets, deployment.variant)

    async def _targeted(self, selector: Selector) -> list[DeviceRecord]:
        devices: list[DeviceRecord] = await self._db(self.store.list_devices)
        return [d for d in devices if selector.matches(d.id, d.group)]

    async def deploy(
        self, name: str, version: str, selector_text: str, variant: str = ""
    ) -> DeploymentStatus:
        selector = parse_selector(selector_text)
        variants = await self.signed_variants(name, version)  # fails early with a helpful message
        if variant and variant not in {v.variant for v in variants}:
            known = ", ".join(sorted(v.variant for v in variants))
            raise NotFoundError(f"{name} {version} has no signed variant {variant!r}; it has: {known}")
        deployment = Deployment(
            "dep-" + secrets.token_hex(4), name, version, str(selector), now_ms(), variant=variant
        )
        targets: dict[str, str] = {}
        pushes: list[tuple[DeviceRecord, ModelRecord]] = []
        unassigned: list[str] = []
        choices: list[str] = []
        for device in await self._targeted(selector):
            chosen, why = choose(variants, device.capabilities, device.bad_targets, variant)
            if chosen is not None:
                targets[device.id] = chosen.target_path
                pushes.append((device, chosen))
                choices.append(f"{device.name} ({device.id}): {chosen.variant}: {why}")
            else:
                unassigned.append(f"{device.name} ({device.id}): {why}")
        await self._db(self.store.add_deployment, deployment, targets)
        status = DeploymentStatus(
            deployment, targeted=len(targets), pending=len(targets), unassigned=unassigned, choices=choices
        )
        # What `push_pending` would read back from the database is known here already: two reads per device
        # would make a deployment to 50,000 devices outlast the CLI's wait.
        for device, chosen in pushes:
            if self.is_connected(device.id):
                status.notified += 1
                pointed = dataclasses.replace(
                    device,
                    desired_target=chosen.target_path,
                    desired_deployment=deployment.id,
                    rollback_command="",
                )
                await self._push_pending_to(pointed, chosen)
        log.info(
            "deployment %s: %s %s to %s (%d devices)", deployment.id, name, version, selector, len(targets)
        )
        return status

    async def rollback(self, selector_text: str, reason: str) -> RollbackResult:
        """Each targeted device goes back to the model it ran before, from its own copy."""
        selector = parse_selector(selector_text)
        result = RollbackResult("rb-" + secrets.token_hex(4))
        targets: dict[str, str] = {}
        for device in await self._targeted(selector):
            previous = (device.previous or {}).get("target_path")
            if not previous:
                result.skipped.append(f"{device.id}: has no previous model")
                continue
            targets[device.id] = previous
        deployment = Deployment(result.command_id, "", "", str(selector), now_ms(), "rollback", reason[:500])
        await self._db(self.store.add_deployment, deployment, targets)
        result.targeted = len(targets)
        for device_id in targets:
            result.notified += self._push(device_id, RollbackPush(result.command_id, reason))
        log.info("rollback %s to %s: %d devices (%s)", result.command_id, selector, len(targets), reason)
        return result

    async def deployment_statuses(self) -> list[DeploymentStatus]:
        deployments: list[Deployment] = await self._db(self.store.list_deployments)
        devices: list[DeviceRecord] = await self._db(self.store.list_devices)
        statuses = {d.id: DeploymentStatus(d) for d in deployments}
        for device in devices:
            status = statuses.get(device.desired_deployment)
            if status is None:
                continue
            current = (device.current or {}).get("target_path")
            if current == device.desired_target and device.last_stage in ("healthy", "rolled_back"):
                status.healthy += 1
            elif device.last_stage == "failed" or device.desired_target in device.bad_targets:
                status.failed += 1
            else:
                status.pending += 1
        for status in statuses.values():
            still_pointing = status.healthy + status.failed + status.pending
            status.targeted = max(status.deployment.devices_targeted, still_pointing)
            status.superseded = status.targeted - still_pointing
        return list(statuses.values())

    async def list_devices(self, selector_text: str = "") -> list[DeviceRecord]:
        devices: list[DeviceRecord] = await self._db(self.store.list_devices)
        if selector_text:
            selector = parse_selector(selector_text)
            devices = [d for d in devices if selector.matches(d.id, d.group)]
        return devices

    async def telemetry(self, device_id: str, limit: int) -> list[tuple[int, dict[str, Any]]]:
        await self._db(self.store.get_device, device_id)  # NOT_FOUND for unknown devices
        return await self._db(self.store.list_telemetry, device_id, max(1, min(limit, 1000)))

    async def events(self, device_id: str, limit: int) -> list[EventRecord]:
        return await self._db(self.store.list_events, device_id, max(1, min(limit, 1000)))
