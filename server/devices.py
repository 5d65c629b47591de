"""The devices: enrollment, revocation, and what each reports (status, update events, telemetry).

A device's status report is the truth about what it runs; the server stores it and pushes what the device
should do next down its control stream (`deployments.push_pending`). Revoking a device ends its stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Mapping

from edgefleet import labels, pki
from edgefleet.errors import AccessDeniedError, ConflictError, InvalidRequestError, NotFoundError
from edgefleet.selectors import Selector, check_name, parse_selector
from edgefleet.server.deployments import Deployments, resolve_selector
from edgefleet.server.repository import Repository
from edgefleet.server.rules import (
    CLOCK_SKEW_WARNING_MS,
    TOKEN_USED_UP,
    certificate_renew_after_ms,
    certificate_renewal_due,
    pending_rollback,
    token_refusal,
)
from edgefleet.server.storage.interfaces import FleetStore
from edgefleet.server.storage.records import DeviceRecord, EventRecord, ModelRecord, now_ms
from edgefleet.server.streams import ControlStreams
from edgefleet.values import Capabilities, DeviceStatus, TelemetryReport, UpdateEvent

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
log = logging.getLogger("edgefleet.server")

MAX_LISTED = 1000  # telemetry reports or events in one answer


class Devices:
    def __init__(
        self,
        store: FleetStore,
        streams: ControlStreams,
        repository: Repository,
        deployments: Deployments,
        ca: pki.CertificateAuthority | None = None,
        device_cert_days: float = 365,
    ):
        self.store = store
        self.streams = streams
        self.repository = repository
        self.deployments = deployments
        self.ca = ca  # None: a plaintext local demo, devices get bearer tokens
        self.device_cert_days = device_cert_days
        self.ignored_messages = 0  # events not newer than the last accepted message (replays)

    async def get(self, device_id: str) -> DeviceRecord:
        """Raises NotFoundError, saying where to look, for an unknown device."""
        try:
            return await asyncio.to_thread(self.store.get_device, device_id)
        except NotFoundError as e:
            raise NotFoundError(f"no device {device_id!r}; see `edgefleet devices`") from e

    # ---- enrollment and revocation -----------------------------------------------------------------------

    async def create_enrollment_token(
        self, group: str, uses: int, ttl_seconds: int, token_labels: Mapping[str, str] | None = None
    ) -> tuple[str, int]:
        """Raises InvalidRequestError for a bad group, count, lifetime or label."""
        check_name("group", group)
        if not 1 <= uses <= 100_000 or not 60 <= ttl_seconds <= 365 * 86400:
            raise InvalidRequestError("uses must be 1..100000 and ttl 60 s..365 days")
        checked = labels.check_labels(token_labels or {})
        expires = now_ms() + ttl_seconds * 1000
        token = "enr_" + secrets.token_urlsafe(32)
        await asyncio.to_thread(self.store.add_enrollment_token, token, group, uses, expires, checked)
        return token, expires

    async def enroll(
        self,
        token: str,
        name: str,
        capabilities: Capabilities,
        csr_pem: bytes = b"",
        trust_root_sha256: str = "",
    ) -> tuple[DeviceRecord, str, bytes]:
        """Consumes one use of the token; returns the device, its bearer secret (plaintext demo) and its
        certificate (TLS: issued for the CSR's key, with the device id the server chose as its name).
        Raises ConflictError, before the token is spent, when the device holds another fleet's root.json."""
        check_name("device name", name)
        if self.ca is not None and not csr_pem:
            raise InvalidRequestError("enrollment needs a certificate signing request (csr_pem)")
        if self.ca is not None:
            pki.load_csr_checked(csr_pem)  # refuse a bad CSR before the token is spent
        if trust_root_sha256:
            await self._check_trust_root(trust_root_sha256)
        now = now_ms()
        found = await asyncio.to_thread(self.store.enrollment_token, token)
        refusal = token_refusal(found, now)
        if refusal:
            raise InvalidRequestError(refusal)
        assert found is not None
        device = DeviceRecord(
            "dev-" + secrets.token_hex(6),
            name,
            found.group,
            now,
            capabilities=capabilities,
            labels=dict(found.labels),
        )
        secret = "dev_" + secrets.token_urlsafe(32)
        if not await asyncio.to_thread(self.store.enroll_device, token, now, device, secret):
            raise InvalidRequestError(TOKEN_USED_UP)  # another device took the last use meanwhile
        certificate = b""
        if self.ca is not None:
            certificate = pki.cert_pem(
                self.ca.sign_csr(csr_pem, device.id, pki.DEVICE, self.device_cert_days)
            )
        await self.deployments.point_new_device(device)
        log.info("enrolled %s (%s) in group %s", device.id, name, device.group)
        return device, secret, certificate

    async def renew_certificate(
        self, device_id: str, presented_pem: bytes, csr_pem: bytes
    ) -> tuple[bytes, int]:
        """A new certificate for the CSR's key when the presented one is due (`rules.certificate_renewal_due`):
        (certificate PEM, 0), or (b"", when it becomes due). The caller has been authenticated with
        `presented_pem` as `device_id`; a revoked device never gets here (the gate refuses it) and is refused
        again here. Raises InvalidRequestError for a bad CSR, AccessDeniedError for a revoked device."""
        if self.ca is None:
            raise InvalidRequestError("this server runs without TLS: there is no certificate to renew")
        device = await self.get(device_id)
        if device.revoked:
            raise AccessDeniedError("this device was revoked by the fleet")
        presented = pki.load_cert(presented_pem)
        if pki.identity_of(presented_pem).name != device.id:
            raise AccessDeniedError("the certificate presented is not this device's")
        not_after_ms = int(presented.not_valid_after_utc.timestamp() * 1000)
        lifetime_ms = int(self.device_cert_days * 86_400_000)
        if not certificate_renewal_due(not_after_ms, now_ms(), lifetime_ms):
            return b"", certificate_renew_after_ms(not_after_ms, lifetime_ms)
        certificate = pki.cert_pem(self.ca.sign_csr(csr_pem, device.id, pki.DEVICE, self.device_cert_days))
        log.info("renewed the certificate of %s (%s)", device.id, device.name)
        return certificate, 0

    async def _check_trust_root(self, digest: str) -> None:
        """A device pinned to a root that is not one of this fleet's root.json versions could never verify an
        update: refuse it while its token can still be used with the right file."""
        if not _SHA256_HEX.fullmatch(digest):
            raise InvalidRequestError("trust_root_sha256 must be 64 hex digits")
        versions = await asyncio.to_thread(self.store.repo_versions)
        for version in range(versions.root, 0, -1):
            root = await asyncio.to_thread(self.store.get_metadata, f"{version}.root")
            if hmac.compare_digest(hashlib.sha256(root).hexdigest(), digest.lower()):
                return
        raise ConflictError(
            f"the device's trust root (sha256 {digest[:16]}...) is not this fleet's root.json: start the agent "
            "with the root.json this server was set up with (--trust-root); the enrollment token was not used"
        )

    async def revoke(self, device: str) -> str:
        """Revokes the device `device` names (id or name); returns its id. NotFoundError / ConflictError as
        `resolve`."""
        device_id = await self.resolve(device)
        await asyncio.to_thread(self.store.set_revoked, device_id)
        self.streams.disconnect(device_id, "credentials revoked")  # ends its control stream now
        log.warning("revoked device %s", device_id)
        return device_id

    async def device_status(self, key: str, by_token: bool) -> tuple[str, bool] | None:
        """(device id, revoked) for a device id or bearer token; None when unknown."""
        if by_token:
            device = await asyncio.to_thread(self.store.device_for_token, key)
        else:
            try:
                device = await asyncio.to_thread(self.store.get_device, key)
            except NotFoundError:
                return None
        return (device.id, device.revoked) if device else None

    # ---- labels ------------------------------------------------------------------------------------------

    async def label(
        self, device: str, change: labels.LabelEdits, overwrite: bool
    ) -> tuple[DeviceRecord, dict[str, str]]:
        """Applies `change` to the labels of the device `device` names (id or name): (the device as it
        was, its labels now). Raises ConflictError for a changed value without `overwrite`, InvalidRequestError
        past 64 labels, NotFoundError / ConflictError as `resolve`. Relabelling moves a device into no
        deployment: a deploy or rollback to a selector decides that, as it always does."""
        device_id = await self.resolve(device)
        for _attempt in range(5):  # another operator's change came in between: apply ours to theirs
            before = await self.get(device_id)
            after = labels.apply_edits(before.labels, change, overwrite)
            if await asyncio.to_thread(self.store.replace_labels, device_id, after, before.labels):
                log.info("labels of %s: %s", device_id, labels.labels_text(after) or "(none)")
                return before, after
        raise ConflictError(f"the labels of {device_id} keep changing meanwhile; try again")

    # ---- what devices report -----------------------------------------------------------------------------

    async def handle_status(self, device_id: str, status: DeviceStatus) -> None:
        """The device's truth about what it runs. A report whose sequence is not newer than the last one
        accepted is ignored (a replay or a reordering), whatever the device's clock says."""
        device = await self.get(device_id)
        if status.sequence <= device.status_sequence:
            log.warning(
                "ignored a stale status report from %s (sequence %d <= %d)",
                device_id,
                status.sequence,
                device.status_sequence,
            )
            return
        skew = status.sent_at_ms - now_ms() if status.sent_at_ms else 0
        if abs(skew) > CLOCK_SKEW_WARNING_MS:
            log.warning(
                "device %s clock is off by %.0f s; its signed-metadata expiry checks will be wrong",
                device_id,
                skew / 1000,
            )
        capabilities = status.capabilities or device.capabilities
        stored = await asyncio.to_thread(
            lambda: self.store.record_status(
                device_id,
                current=status.current,
                previous=status.previous,
                capabilities=capabilities,
                bad_targets=status.bad_targets,
                sequence=status.sequence,
                clock_skew_ms=skew,
                seen_ms=now_ms(),
            )
        )
        if stored:
            await self.deployments.push_pending(device_id)

    async def assignment_for(self, device_id: str) -> tuple[ModelRecord | None, str, str]:
        """For the periodic check: (desired model, deployment id, pending rollback command id)."""
        device = await self.get(device_id)
        await asyncio.to_thread(self.store.touch, device_id, now_ms())
        record = await self.repository.model(device.desired_target) if device.desired_target else None
        return record, device.desired_deployment, pending_rollback(device)

    async def handle_event(self, device_id: str, event: UpdateEvent) -> None:
        """One step of an update, as the device reports it. An event not newer than the last message accepted
        from the device (status or event: one counter) is ignored, so a replayed old "healthy" changes
        nothing. It counts for a deployment (the device's last stage) only when it names the deployment the
        device is assigned now, that deployment's target and that target's sha256, or reports a rollback."""
        device = await self.get(device_id)
        if event.sequence <= device.status_sequence or not await asyncio.to_thread(
            self.store.advance_sequence, device_id, event.sequence
        ):
            self.ignored_messages += 1
            log.warning(
                "ignored a stale %s event from %s (sequence %d <= %d)",
                event.stage,
                device_id,
                event.sequence,
                device.status_sequence,
            )
            return
        record = EventRecord(
            device_id,
            event.target_path,
            event.stage,
            event.reason,
            event.at_ms or now_ms(),
            device.desired_deployment,
        )
        if event.repeated and await asyncio.to_thread(self._is_a_repeat, record):
            log.debug("device %s repeated its last event, which the server has", device_id)
            return  # sent again after a reconnect (in case it was lost in flight), and it was not
        # A rollback (ordered or automatic) is news about what the device runs, whichever assignment it had.
        about_now = (
            event.target_path == device.desired_target
            and event.deployment_id in ("", device.desired_deployment)  # "": sent before it heard (a restart)
            and await self._names_the_desired_bytes(device, event)
        )
        if event.repeated:  # late news: it counts only for the very order it names (or rollback it obeyed)
            counts = (about_now and event.deployment_id == device.desired_deployment) or (
                event.stage == "rolled_back"
                and bool(event.command_id)
                and event.command_id == device.rollback_command
            )
        else:
            counts = not device.desired_deployment or about_now or event.stage == "rolled_back"
        if counts:
            # Only for the order it was judged against: a newer one may have landed since the read.
            await asyncio.to_thread(
                lambda: self.store.record_stage(
                    device_id, event.stage, event.reason, now_ms(), deployment=device.desired_deployment
                )
            )
        if event.stage == "rolled_back" and event.command_id:
            await asyncio.to_thread(self.store.clear_rollback, device_id, event.command_id)  # obeyed
        # The history last: a server killed before it keeps no record, so the device's repeat still counts.
        await asyncio.to_thread(self.store.add_event, record)
        log.info("device %s: %s %s %s", device_id, event.stage, record.target_path, record.reason)

    def _is_a_repeat(self, record: EventRecord) -> bool:
        """Whether the device's newest recorded event is this one, repeated (a device sends its last event
        again on every new stream). Blocking: run in a thread."""
        newest = self.store.list_events(record.device_id, 1)
        if not newest:
            return False
        last = newest[-1]
        return (last.target_path, last.stage, last.at_ms, last.reason) == (
            record.target_path,
            record.stage,
            record.at_ms,
            record.reason,
        )

    async def _names_the_desired_bytes(self, device: DeviceRecord, event: UpdateEvent) -> bool:
        """Whether the event reports on the very file the device was assigned: its target_sha256 is the
        desired model's. Otherwise it stays in the device's history and counts for no deployment (an
        event about other bytes at the same path, or one that names none, is never "healthy" for it)."""
        try:
            desired = (await self.repository.model(device.desired_target)).sha256
        except NotFoundError:
            desired = ""
        if desired and hmac.compare_digest(event.target_sha256.lower(), desired.lower()):
            return True
        log.warning(
            "device %s reported %s on %s sha256 %r, but was assigned sha256 %r: kept as its report, "
            "not counted for deployment %s",
            device.id, event.stage, event.target_path, event.target_sha256[:16], desired[:16],
            device.desired_deployment,
        )  # fmt: skip
        return False

    async def handle_telemetry(self, device_id: str, report: TelemetryReport) -> None:
        if not report.at_ms:
            report = dataclasses.replace(report, at_ms=now_ms())
        await asyncio.to_thread(self.store.add_telemetry, device_id, report)

    # ---- listings ----------------------------------------------------------------------------------------

    async def list_devices(self, selector_text: str = "") -> list[DeviceRecord]:
        if not selector_text:
            return await asyncio.to_thread(self.store.list_devices)
        selector = await resolve_selector(self.store, parse_selector(selector_text))
        return await asyncio.to_thread(self.store.devices_matching, selector)

    async def resolve(self, id_or_name: str) -> str:
        """The id of the device `id_or_name` names (its id, or its name when no id matches). Raises
        NotFoundError for no such device, ConflictError for a name several devices share."""
        selector = await resolve_selector(self.store, Selector("device", id_or_name))
        return (await self.get(selector.value)).id

    async def telemetry(self, device: str, limit: int) -> list[TelemetryReport]:
        """`device` is an id or a name; NotFoundError when it names no device."""
        device_id = await self.resolve(device)
        return await asyncio.to_thread(self.store.list_telemetry, device_id, max(1, min(limit, MAX_LISTED)))

    async def events(self, device: str, limit: int) -> list[EventRecord]:
        """Every device's events for "", else one device's by id or name (NotFoundError, as `telemetry`)."""
        device_id = await self.resolve(device) if device else ""
        return await asyncio.to_thread(self.store.list_events, device_id, max(1, min(limit, MAX_LISTED)))
