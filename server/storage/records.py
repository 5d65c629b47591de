"""The records the server keeps, as the logic layer sees them: small dataclasses with typed values
(`ModelRef`, `Capabilities`, `TelemetryReport` from `edgefleet.values`). Each store converts them to and
from its own columns at its boundary; nothing above storage sees a row or a JSON column."""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgefleet.audit_chain import AuditEntry
from edgefleet.values import Capabilities, ModelRef
from edgefleet.variant_metrics import VariantMetrics


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class ModelRecord:
    target_path: str
    name: str
    version: str
    variant: str
    sha256: str
    length: int
    signature: dict[str, Any]  # the tensor signature, as edgefleet.modelinfo writes it
    created_ms: int
    signed: bool = False
    details: dict[str, Any] = field(default_factory=dict)  # measured metrics, eval results, why excluded

    def ref(self) -> ModelRef:
        return ModelRef(self.target_path, self.name, self.version, self.variant, self.sha256, self.length)

    @functools.cached_property
    def metrics(self) -> VariantMetrics:
        """The measured figures in `details`, typed (read once per record: a deploy asks every device)."""
        return VariantMetrics.from_details(self.details, self.length)


@dataclass
class DeviceRecord:
    id: str
    name: str
    group: str
    enrolled_ms: int
    last_seen_ms: int = 0
    current: ModelRef | None = None
    previous: ModelRef | None = None
    desired_target: str = ""
    desired_deployment: str = ""
    capabilities: Capabilities = field(default_factory=Capabilities)
    bad_targets: tuple[str, ...] = ()
    last_stage: str = ""
    last_reason: str = ""
    rollback_command: str = ""  # the rollback order the device has not obeyed yet, "" = none
    revoked: bool = False
    status_sequence: int = 0
    clock_skew_ms: int = 0
    labels: Mapping[str, str] = field(
        default_factory=dict
    )  # edgefleet.labels rules; replaced whole, never edited

    @property
    def current_target(self) -> str:
        return self.current.target_path if self.current else ""


@dataclass(frozen=True)
class EnrollmentToken:
    group: str
    uses_left: int
    expires_ms: int
    labels: Mapping[str, str] = field(default_factory=dict)  # what each device enrolled with it carries


@dataclass
class Deployment:
    id: str
    model_name: str
    version: str
    selector: str
    created_ms: int
    kind: str = "deploy"  # or "rollback"
    reason: str = ""
    variant: str = ""  # pinned variant, "" = the per-device choice
    devices_targeted: int = 0  # every device it has pointed at, also those a later deployment took over


@dataclass(frozen=True)
class DeploymentCounts:
    """Where the devices that still point at one deployment stand."""

    healthy: int = 0  # run its target and reported healthy (or rolled back to it)
    failed: int = 0  # reported failed, or refused its target before
    pending: int = 0  # everything else: not there yet

    @property
    def pointing(self) -> int:
        return self.healthy + self.failed + self.pending


@dataclass
class EventRecord:
    device_id: str
    target_path: str
    stage: str
    reason: str
    at_ms: int
    deployment_id: str = ""


@dataclass
class RepoVersions:
    root: int = 0
    targets: int = 0
    snapshot: int = 0
    timestamp: int = 0


@dataclass(frozen=True)
class AuditPage:
    """Audit entries (oldest first) and the log's head (newest seq and hash), read together."""

    entries: list[AuditEntry]
    head_seq: int
    head_sha256: str
