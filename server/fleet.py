"""The fleet server's logic, composed: one `Fleet` holds the parts and the storage they share.

- `repository` (server.repository): uploads, signed metadata, publishing;
- `deployments` (server.deployments): deploy, rollback, what each rollout reached;
- `devices` (server.devices): enrollment, revocation, status, events, telemetry;
- `streams` (server.streams): the devices' open control streams;
- `audit` (server.audit): the append-only log of operator actions and rollout decisions.

None of it imports grpc: the servicers translate protobuf to calls on these parts, and the errors raised
here (edgefleet.errors) to status codes. Storage calls are blocking and run in threads.
"""

from __future__ import annotations

from edgefleet import pki, signing
from edgefleet.server.audit import AuditLog
from edgefleet.server.deployments import Deployments
from edgefleet.server.devices import Devices
from edgefleet.server.repository import Repository
from edgefleet.server.rollouts.actions import RolloutActions
from edgefleet.server.rollouts.audit_hook import AuditRecorder
from edgefleet.server.rollouts.engine import RolloutEngine
from edgefleet.server.storage.interfaces import BlobStore, FleetStore
from edgefleet.server.streams import ControlStreams


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
        audit: AuditRecorder | None = None,
        rollout_tick_s: float = 1.0,
    ):
        self.store = store
        self.blobs = blobs
        self.ca = ca
        self.streams = ControlStreams()
        self.repository = Repository(
            store,
            blobs,
            online,
            trust_root,
            validate_runtime,
            max_model_bytes,
            describe_timeout_s=describe_timeout_s,
            describe_memory_bytes=describe_memory_bytes,
        )
        self.deployments = Deployments(store, self.streams, self.repository)
        self.devices = Devices(
            store, self.streams, self.repository, self.deployments, ca=ca, device_cert_days=device_cert_days
        )
        self.audit = AuditLog(store)
        # Staged rollouts (server.rollouts): the engine's loop starts with the server (app.py).
        self.rollout_engine = RolloutEngine(
            store, self.deployments, audit or self.audit, tick_s=rollout_tick_s
        )
        self.rollouts = RolloutActions(self.rollout_engine)

    @property
    def parts(self) -> tuple[object, ...]:
        """Every part a handler can call (for tests that watch which ones run)."""
        return (self.repository, self.deployments, self.devices, self.streams, self.audit, self.rollouts)
