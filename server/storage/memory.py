"""`MemoryFleetStore`: every record in this process's memory, gone when it ends (`memory://`).

For tests and throwaway demos. It keeps the same contract as `SqlFleetStore` (tests/contract/test_storage.py runs
one suite against both): records go in and come out as copies, so a caller changing a record it holds
changes nothing stored, and one lock makes each method one atomic step, as a transaction would.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from edgefleet import audit_chain
from edgefleet.audit_chain import AuditEntry
from edgefleet.errors import ConflictError, NotFoundError
from edgefleet.selectors import Selector
from edgefleet.server.storage.interfaces import FleetStore
from edgefleet.server.storage.records import (
    AuditPage,
    Deployment,
    DeploymentCounts,
    DeviceRecord,
    EnrollmentToken,
    EventRecord,
    ModelRecord,
    RepoVersions,
)
from edgefleet.server.storage.rollout_records import RolloutStore
from edgefleet.values import Capabilities, ModelRef, TelemetryReport


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _copy(record: Any) -> Any:
    if isinstance(record, DeviceRecord):  # labels are a mapping: the copy gets its own
        return dataclasses.replace(record, labels=dict(record.labels))
    return dataclasses.replace(record)


class MemoryFleetStore(FleetStore):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, EnrollmentToken] = {}
        self._devices: dict[str, DeviceRecord] = {}
        self._credentials: dict[str, str] = {}  # credential hash -> device id
        self._models: dict[str, ModelRecord] = {}
        self._metadata: dict[str, bytes] = {}
        self._versions = RepoVersions()
        self._deployments: dict[str, Deployment] = {}
        self._events: list[EventRecord] = []
        self._telemetry: list[tuple[str, TelemetryReport]] = []
        self._rollouts: RolloutStore | None = None
        self._audit: list[AuditEntry] = []

    def close(self) -> None:
        pass

    def rollouts(self) -> RolloutStore:
        if self._rollouts is None:
            from edgefleet.server.storage.rollout_sql import SqlRolloutStore

            self._rollouts = SqlRolloutStore.in_memory(self._telemetry_since)
        return self._rollouts

    def _telemetry_since(self, device_ids: Sequence[str], since_ms: int) -> dict[str, list[TelemetryReport]]:
        wanted = set(device_ids)
        found: dict[str, list[TelemetryReport]] = {}
        with self._lock:
            for device_id, report in self._telemetry:
                if device_id in wanted and report.at_ms >= since_ms:
                    found.setdefault(device_id, []).append(report)
        return found

    # ---- enrollment --------------------------------------------------------------------------------------

    def add_enrollment_token(
        self, token: str, group: str, uses: int, expires_ms: int, labels: Mapping[str, str] | None = None
    ) -> None:
        with self._lock:
            self._tokens[_hash(token)] = EnrollmentToken(group, uses, expires_ms, dict(labels or {}))

    def enrollment_token(self, token: str) -> EnrollmentToken | None:
        with self._lock:
            return self._tokens.get(_hash(token))

    def enroll_device(self, token: str, now_ms: int, device: DeviceRecord, credential: str) -> bool:
        with self._lock:
            found = self._tokens.get(_hash(token))
            if found is None or found.uses_left <= 0 or found.expires_ms < now_ms:
                return False
            self._tokens[_hash(token)] = dataclasses.replace(found, uses_left=found.uses_left - 1)
            self._devices[device.id] = _copy(device)
            self._credentials[_hash(credential)] = device.id
            return True

    # ---- devices -----------------------------------------------------------------------------------------

    def device_for_token(self, credential: str) -> DeviceRecord | None:
        with self._lock:
            device_id = self._credentials.get(_hash(credential))
            return _copy(self._devices[device_id]) if device_id else None

    def get_device(self, device_id: str) -> DeviceRecord:
        with self._lock:
            return _copy(self._device(device_id))

    def _device(self, device_id: str) -> DeviceRecord:
        found = self._devices.get(device_id)
        if found is None:
            raise NotFoundError(f"no device {device_id!r}")
        return found

    def list_devices(self) -> list[DeviceRecord]:
        return self.devices_matching(Selector("all"))

    def devices_named(self, name: str) -> list[DeviceRecord]:
        with self._lock:
            return [_copy(d) for d in sorted(self._devices.values(), key=lambda d: d.id) if d.name == name]

    def devices_matching(self, selector: Selector) -> list[DeviceRecord]:
        with self._lock:
            if selector.kind == "device":
                found = self._devices.get(selector.value)
                matching = [found] if found else []
            else:
                matching = [d for d in self._devices.values() if selector.matches(d.id, d.group, d.labels)]
            return [_copy(d) for d in sorted(matching, key=lambda d: (d.name, d.id))]

    def record_status(
        self,
        device_id: str,
        *,
        current: ModelRef | None,
        previous: ModelRef | None,
        capabilities: Capabilities,
        bad_targets: tuple[str, ...],
        sequence: int,
        clock_skew_ms: int,
        seen_ms: int,
    ) -> bool:
        with self._lock:
            device = self._devices.get(device_id)
            if device is None or sequence <= device.status_sequence:
                return False
            device.current, device.previous, device.capabilities = current, previous, capabilities
            device.bad_targets, device.status_sequence = tuple(bad_targets), sequence
            device.clock_skew_ms, device.last_seen_ms = clock_skew_ms, seen_ms
            return True

    def advance_sequence(self, device_id: str, sequence: int) -> bool:
        with self._lock:
            device = self._devices.get(device_id)
            if device is None or sequence <= device.status_sequence:
                return False
            device.status_sequence = sequence
            return True

    def record_stage(
        self, device_id: str, stage: str, reason: str, seen_ms: int, *, deployment: str | None = None
    ) -> bool:
        with self._lock:
            device = self._devices.get(device_id)
            if device is None or (deployment is not None and device.desired_deployment != deployment):
                return False
            device.last_stage, device.last_reason = stage, reason
            device.last_seen_ms = max(device.last_seen_ms, seen_ms)
            return True

    def clear_rollback(self, device_id: str, command_id: str) -> bool:
        with self._lock:
            device = self._devices.get(device_id)
            if device is None or device.rollback_command != command_id:
                return False
            device.rollback_command = ""
            return True

    def touch(self, device_id: str, seen_ms: int) -> None:
        with self._lock:
            device = self._devices.get(device_id)
            if device is not None:
                device.last_seen_ms = seen_ms

    def set_revoked(self, device_id: str) -> None:
        with self._lock:
            self._device(device_id).revoked = True

    # ---- labels ----------------------------------------------------------------------------------------

    def replace_labels(self, device_id: str, labels: Mapping[str, str], expected: Mapping[str, str]) -> bool:
        with self._lock:
            device = self._device(device_id)
            if dict(device.labels) != dict(expected):
                return False
            device.labels = dict(labels)
            return True

    # ---- models and signed metadata ----------------------------------------------------------------------

    def add_model(self, record: ModelRecord) -> None:
        with self._lock:
            if record.target_path in self._models:
                raise ConflictError(f"model file {record.target_path} exists already")
            self._models[record.target_path] = _model_copy(record)

    def get_model(self, target_path: str) -> ModelRecord:
        with self._lock:
            found = self._models.get(target_path)
            if found is None:
                raise NotFoundError(f"no model file {target_path!r}")
            return _model_copy(found)

    def list_models(self, name: str = "") -> list[ModelRecord]:
        with self._lock:
            chosen = [m for m in self._models.values() if not name or m.name == name]
            chosen.sort(key=lambda m: (m.name, m.created_ms, m.target_path))
            return [_model_copy(m) for m in chosen]

    def mark_signed(self, target_paths: list[str]) -> None:
        with self._lock:
            for path in target_paths:
                if path in self._models:
                    self._models[path].signed = True

    def put_metadata(self, files: dict[str, bytes], versions: RepoVersions, expected: RepoVersions) -> None:
        with self._lock:
            if self._versions != expected:
                raise ConflictError("the stored metadata versions changed meanwhile")
            self._versions = _copy(versions)
            self._metadata.update(files)

    def get_metadata(self, name: str) -> bytes:
        with self._lock:
            found = self._metadata.get(name)
        if found is None:
            raise NotFoundError(f"no metadata {name!r}")
        return found

    def repo_versions(self) -> RepoVersions:
        with self._lock:
            return _copy(self._versions)

    # ---- deployments -------------------------------------------------------------------------------------

    def add_deployment(
        self, deployment: Deployment, device_targets: dict[str, str], rollback_command: str = ""
    ) -> None:
        with self._lock:
            if deployment.id in self._deployments:
                raise ConflictError(f"deployment {deployment.id} exists already")
            pointed = 0
            for device_id, target in device_targets.items():
                device = self._devices.get(device_id)
                if device is None:
                    continue
                device.desired_target, device.desired_deployment = target, deployment.id
                device.rollback_command = rollback_command
                pointed += 1
            self._deployments[deployment.id] = dataclasses.replace(deployment, devices_targeted=pointed)

    def add_deployment_target(self, deployment_id: str, device_id: str, target: str) -> None:
        with self._lock:
            device = self._devices.get(device_id)
            if device is None or device.desired_deployment == deployment_id:
                return  # count each device once
            device.desired_target, device.desired_deployment = target, deployment_id
            device.rollback_command = ""  # a newer order than any rollback it had not obeyed
            device.last_stage, device.last_reason = "", ""  # its reports were about an earlier order
            deployment = self._deployments.get(deployment_id)
            if deployment is not None:
                deployment.devices_targeted += 1

    def list_deployments(self) -> list[Deployment]:
        with self._lock:
            ordered = sorted(self._deployments.values(), key=lambda d: (d.created_ms, d.id))
            return [_copy(d) for d in ordered]

    def deployment_counts(self) -> dict[str, DeploymentCounts]:
        tally: dict[str, list[int]] = {}
        with self._lock:
            for device in self._devices.values():
                if not device.desired_deployment:
                    continue
                counts = tally.setdefault(device.desired_deployment, [0, 0, 0])
                healthy = device.current_target == device.desired_target and device.last_stage in (
                    "healthy",
                    "rolled_back",
                )
                failed = device.last_stage == "failed" or device.desired_target in device.bad_targets
                counts[0 if healthy else 1 if failed else 2] += 1
        return {deployment_id: DeploymentCounts(*counts) for deployment_id, counts in tally.items()}

    # ---- events and telemetry ----------------------------------------------------------------------------

    def add_event(self, event: EventRecord) -> None:
        with self._lock:
            self._events.append(_copy(event))

    def list_events(
        self, device_id: str = "", limit: int = 100, deployment_id: str = ""
    ) -> list[EventRecord]:
        with self._lock:
            chosen = [
                e
                for e in self._events
                if (not device_id or e.device_id == device_id)
                and (not deployment_id or e.deployment_id == deployment_id)
            ]
            return [_copy(e) for e in chosen[-limit:]] if limit > 0 else []

    def add_telemetry(self, device_id: str, report: TelemetryReport) -> None:
        with self._lock:
            self._telemetry.append((device_id, report))  # frozen: no copy needed

    def list_telemetry(self, device_id: str, limit: int) -> list[TelemetryReport]:
        with self._lock:
            chosen = [report for owner, report in self._telemetry if owner == device_id]
            return chosen[-limit:] if limit > 0 else []

    # ---- the audit log ---------------------------------------------------------------------------------

    def add_audit(self, at_ms: int, actor: str, action: str, subject: str, details_json: str) -> AuditEntry:
        with self._lock:
            previous = self._audit[-1].sha256 if self._audit else audit_chain.GENESIS
            entry = audit_chain.seal(
                previous, len(self._audit) + 1, at_ms, actor, action, subject, details_json
            )
            self._audit.append(entry)  # frozen: no copy needed
            return entry

    def list_audit(self, since_ms: int, action: str, from_seq: int, limit: int) -> AuditPage:
        with self._lock:
            chosen = [
                e
                for e in self._audit
                if e.at_ms >= since_ms
                and (not action or e.action == action or e.action.startswith(action + "."))
                and e.seq >= from_seq
            ]
            head = self._audit[-1] if self._audit else None
        page = (chosen[:limit] if from_seq else chosen[-limit:]) if limit > 0 else []
        return AuditPage(page, head.seq if head else 0, head.sha256 if head else audit_chain.GENESIS)


def _model_copy(record: ModelRecord) -> ModelRecord:
    # details and signature are nested JSON-like values: a caller's later edit must not reach the store.
    return copy.deepcopy(record)
