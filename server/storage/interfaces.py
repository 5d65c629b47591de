"""The storage interfaces, named by role: `FleetStore` keeps every record, `BlobStore` keeps model files.

Implementations are named by mechanism (`SqlFleetStore`, `MemoryFleetStore`, `FilesystemBlobStore`) and
chosen by `edgefleet.server.storage.open_store(url)`. Stores are synchronous; the async logic calls them
through `asyncio.to_thread`. They hold no rules: what a token's state means, what a rollback is, what to
tell an operator is decided above them; they offer the atomic primitives those decisions need.

Every FleetStore method raises TransportError when the database is unavailable (the caller answers
UNAVAILABLE, retryable), and NotFoundError / ConflictError where named.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from pathlib import Path

from edgefleet.audit_chain import AuditEntry
from edgefleet.selectors import Selector
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


class FleetStore(abc.ABC):
    """Everything the server remembers except model bytes."""

    # ---- enrollment --------------------------------------------------------------------------------------

    @abc.abstractmethod
    def add_enrollment_token(
        self, token: str, group: str, uses: int, expires_ms: int, labels: Mapping[str, str] | None = None
    ) -> None:
        """Keeps only a hash of `token`; `labels` go to every device enrolled with it."""

    @abc.abstractmethod
    def enrollment_token(self, token: str) -> EnrollmentToken | None: ...

    @abc.abstractmethod
    def enroll_device(self, token: str, now_ms: int, device: DeviceRecord, credential: str) -> bool:
        """In one transaction: takes one use of `token` if one is left and it has not expired at `now_ms`,
        and adds `device` (with its labels) and its secret `credential` (kept as a hash). False, writing nothing, when no use
        was taken (two devices racing on the last use cannot both succeed)."""

    # ---- devices -----------------------------------------------------------------------------------------

    @abc.abstractmethod
    def device_for_token(self, credential: str) -> DeviceRecord | None: ...

    @abc.abstractmethod
    def get_device(self, device_id: str) -> DeviceRecord:
        """Raises NotFoundError for an unknown id."""

    @abc.abstractmethod
    def list_devices(self) -> list[DeviceRecord]:
        """Ordered by name, then id."""

    @abc.abstractmethod
    def devices_named(self, name: str) -> list[DeviceRecord]:
        """The devices enrolled under `name` (names are not unique), ordered by id."""

    @abc.abstractmethod
    def devices_matching(self, selector: Selector) -> list[DeviceRecord]:
        """The devices `selector` names (group, id and label requirements), ordered as `list_devices`,
        read by a query rather than a scan."""

    @abc.abstractmethod
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
        """Stores a device's report, only if `sequence` is newer than the last one stored; False otherwise
        (a replay or a reordering changes nothing)."""

    @abc.abstractmethod
    def advance_sequence(self, device_id: str, sequence: int) -> bool:
        """Takes `sequence` as the device's last accepted message (an event) if it is newer than the last one;
        False otherwise (a replay: the caller ignores the message)."""

    @abc.abstractmethod
    def record_stage(
        self, device_id: str, stage: str, reason: str, seen_ms: int, *, deployment: str | None = None
    ) -> bool:
        """The update stage the device reported last, and why; `last_seen_ms` never goes back. With
        `deployment`, only while the device is still assigned that deployment (the one the report was
        judged against): a report read before a newer order landed is not counted for it. False when
        nothing was written."""

    @abc.abstractmethod
    def clear_rollback(self, device_id: str, command_id: str) -> bool:
        """Drops the device's pending rollback order if it is `command_id`; False when it was not."""

    @abc.abstractmethod
    def touch(self, device_id: str, seen_ms: int) -> None:
        """The device was heard from at `seen_ms`."""

    @abc.abstractmethod
    def set_revoked(self, device_id: str) -> None:
        """Raises NotFoundError for an unknown id."""

    # ---- labels ----------------------------------------------------------------------------------------

    @abc.abstractmethod
    def replace_labels(self, device_id: str, labels: Mapping[str, str], expected: Mapping[str, str]) -> bool:
        """Sets the device's labels to `labels`, only if they still are `expected` (compare and swap: the
        caller read them, applied its rules, and retries on False). Raises NotFoundError for an unknown id."""

    # ---- models and signed metadata ----------------------------------------------------------------------

    @abc.abstractmethod
    def add_model(self, record: ModelRecord) -> None:
        """Raises ConflictError when the target path exists already."""

    @abc.abstractmethod
    def get_model(self, target_path: str) -> ModelRecord:
        """Raises NotFoundError for an unknown path."""

    @abc.abstractmethod
    def list_models(self, name: str = "") -> list[ModelRecord]:
        """Every model file ("" = of every model), by name, then upload time."""

    @abc.abstractmethod
    def mark_signed(self, target_paths: list[str]) -> None: ...

    @abc.abstractmethod
    def put_metadata(self, files: dict[str, bytes], versions: RepoVersions, expected: RepoVersions) -> None:
        """Stores a release atomically, only if the stored versions still equal `expected` (else
        ConflictError)."""

    @abc.abstractmethod
    def get_metadata(self, name: str) -> bytes:
        """Raises NotFoundError for an unknown file."""

    @abc.abstractmethod
    def repo_versions(self) -> RepoVersions: ...

    # ---- deployments -------------------------------------------------------------------------------------

    @abc.abstractmethod
    def add_deployment(
        self, deployment: Deployment, device_targets: dict[str, str], rollback_command: str = ""
    ) -> None:
        """In one transaction: records the deployment, sets each listed device's desired target and
        deployment, and sets its pending rollback order to `rollback_command` ("" clears it). The
        deployment's `devices_targeted` becomes the number of devices pointed at."""

    @abc.abstractmethod
    def add_deployment_target(self, deployment_id: str, device_id: str, target: str) -> None:
        """Points one more device (e.g. one that enrolled later) at an existing deployment, clearing its
        pending rollback and its last stage in the same write (so a report on the new order, which the
        device may send as soon as it is pointed, is never overwritten); a device that already points at
        it is counted once and left as it is."""

    @abc.abstractmethod
    def list_deployments(self) -> list[Deployment]:
        """Oldest first."""

    @abc.abstractmethod
    def deployment_counts(self) -> dict[str, DeploymentCounts]:
        """For each deployment some device still points at: how many are healthy, failed and pending,
        counted by the store (one query), not by reading every device."""

    # ---- events and telemetry ----------------------------------------------------------------------------

    @abc.abstractmethod
    def add_event(self, event: EventRecord) -> None: ...

    @abc.abstractmethod
    def list_events(
        self, device_id: str = "", limit: int = 100, deployment_id: str = ""
    ) -> list[EventRecord]:
        """The newest `limit` events ("" = of every device / deployment), oldest first."""

    @abc.abstractmethod
    def add_telemetry(self, device_id: str, report: TelemetryReport) -> None: ...

    @abc.abstractmethod
    def list_telemetry(self, device_id: str, limit: int) -> list[TelemetryReport]:
        """The newest `limit` reports of the device, oldest first."""

    # ---- the audit log: insert and list, nothing else ------------------------------------------------

    @abc.abstractmethod
    def add_audit(self, at_ms: int, actor: str, action: str, subject: str, details_json: str) -> AuditEntry:
        """Appends one entry after the newest, in one transaction with it: the next seq, sealed onto the
        newest entry's hash (`edgefleet.audit_chain.seal`), and the head moved to it. Returns the entry."""

    @abc.abstractmethod
    def list_audit(self, since_ms: int, action: str, from_seq: int, limit: int) -> AuditPage:
        """Entries at or after `since_ms` whose action is `action` or starts with `action` + "." ("" = any):
        the first `limit` with seq >= `from_seq`, or the newest `limit` when `from_seq` is 0; oldest first."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # ---- staged rollouts (rollout_records.py) ------------------------------------------------------------

    @abc.abstractmethod
    def rollouts(self) -> RolloutStore:
        """The rollout records, in this store's database (one object per store)."""


class BlobWriter(abc.ABC):
    """One upload in progress: bytes go to a temporary place, hashed as they come; `commit` moves them to
    their content address."""

    length: int

    @abc.abstractmethod
    def write(self, chunk: bytes) -> None:
        """Raises InvalidRequestError past the store's size limit."""

    @abc.abstractmethod
    def commit(self, expected_sha256: str = "") -> str:
        """Returns the sha256; raises HashMismatchError when it is not `expected_sha256`."""

    @abc.abstractmethod
    def abort(self) -> None: ...


class BlobStore(abc.ABC):
    """Model files, keyed by their sha256."""

    @abc.abstractmethod
    def begin_write(self) -> BlobWriter: ...

    @abc.abstractmethod
    def put_bytes(self, data: bytes) -> str:
        """Stores `data` whole; returns its sha256."""

    @abc.abstractmethod
    def path(self, sha256: str) -> Path:
        """Raises InvalidRequestError for anything but 64 lowercase hex digits."""

    @abc.abstractmethod
    def read(self, sha256: str, offset: int, chunk_size: int) -> Iterator[bytes]: ...
