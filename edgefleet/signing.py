"""The fleet's signed model repository, on python-tuf's Metadata API.

Who holds which key (the TUF roles):

    root       offline, the operator's; signs root.json, which devices pin at enrollment
    targets    the operator's; signs which model files exist, with their hash, length and custom fields
               (tensor signature, golden input/output, runtime compatibility, measured metrics)
    snapshot   online, the server's; fixes the version of targets.json that belongs to a release
    timestamp  online, the server's; short-lived, re-signed by the server so devices notice a frozen server

So the server can publish and freshen metadata but cannot add or change a model: only a targets signature
does that. Devices verify with python-tuf's ngclient (`DeviceTrust`), which also persists the highest
versions it has seen, so validly signed but older metadata is refused after a restart too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from edgefleet.durable import write_atomic
from edgefleet.errors import (
    InvalidRequestError,
    SignatureError,
)

ROOT_LIFETIME = timedelta(days=365)
TARGETS_LIFETIME = timedelta(days=365)
SNAPSHOT_LIFETIME = timedelta(days=7)
TIMESTAMP_LIFETIME = timedelta(days=1)

_SERIALIZER = JSONSerializer(compact=False)


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


# ---- keys ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyFiles:
    root: Path
    targets: Path
    online: Path
    trust_root: Path  # root.json: what devices pin and the server starts from

    @classmethod
    def in_dir(cls, folder: Path) -> KeyFiles:
        folder = Path(folder)
        return cls(folder / "root.key", folder / "targets.key", folder / "online.key", folder / "root.json")


def save_signer(signer: CryptoSigner, path: Path) -> None:
    write_atomic(path, signer.private_bytes, mode=0o600)


def load_signer(path: Path) -> Signer:
    """Loads an Ed25519 private key written by `edgefleet keys init`. Raises SignatureError."""
    try:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        private = load_pem_private_key(Path(path).read_bytes(), password=None)
        return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))
    except (OSError, ValueError, TypeError) as e:
        raise SignatureError(f"cannot load signing key {path}: {e}") from e


def init_keys(folder: Path, *, force: bool = False) -> KeyFiles:
    """Creates the operator's root and targets keys, the server's online key, and root.json v1."""
    files = KeyFiles.in_dir(folder)
    existing = [p for p in (files.root, files.targets, files.online, files.trust_root) if p.exists()]
    if existing and not force:
        raise InvalidRequestError(
            f"{existing[0]} already exists; keep it, or pass --force to start a new fleet"
        )
    signers = {name: CryptoSigner.generate_ed25519() for name in ("root", "targets", "online")}
    root = Root(expires=utcnow() + ROOT_LIFETIME, consistent_snapshot=True)
    root.add_key(signers["root"].public_key, Root.type)
    root.add_key(signers["targets"].public_key, Targets.type)
    root.add_key(signers["online"].public_key, Snapshot.type)
    root.add_key(signers["online"].public_key, Timestamp.type)
    md = Metadata(root)
    md.sign(signers["root"])
    for name, path in (("root", files.root), ("targets", files.targets), ("online", files.online)):
        save_signer(signers[name], path)
    write_atomic(files.trust_root, md.to_bytes(_SERIALIZER))
    return files


# ---- parsing with clean errors ---------------------------------------------------------------------------


def parse_metadata(data: bytes, expected_type: str, max_bytes: int = 4 * 2**20) -> Metadata[Any]:
    """Raises InvalidRequestError for oversized, malformed or mistyped metadata."""
    if len(data) > max_bytes:
        raise InvalidRequestError(f"{expected_type} metadata is {len(data)} bytes; the limit is {max_bytes}")
    try:
        md = Metadata.from_bytes(data)
    except (DeserializationError, ValueError, TypeError, KeyError) as e:
        raise InvalidRequestError(f"malformed {expected_type} metadata: {e}") from e
    if md.signed.type != expected_type:
        raise InvalidRequestError(f"expected {expected_type} metadata, got {md.signed.type}")
    return md


def verify_role(root: Root, role: str, md: Metadata[Any]) -> None:
    """Threshold check with distinct keys (tuf counts each keyid once). Raises SignatureError."""
    try:
        root.verify_delegate(role, md.signed_bytes, md.signatures)
    except tuf_exceptions.UnsignedMetadataError as e:
        raise SignatureError(f"{role} metadata is not signed by the trusted {role} key(s): {e}") from e


# ---- operator side: signing targets ----------------------------------------------------------------------


ROLLBACK_FIELD = "x-edgefleet-rollback"
ROLLOUT_FIELD = "x-edgefleet-rollouts"


@dataclass(frozen=True)
class RolloutPermit:
    """The operator's signed permission, given when a rollout starts, for devices to go back if it is aborted.

    It lets a device that runs `model` at `candidate_sequence` return to its previous version when that has
    sequence >= `min_sequence` (the incumbents the rollout replaces), on an order naming this rollout; it
    allows nothing else, on no other model or version."""

    model: str
    candidate_sequence: int
    min_sequence: int

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "candidate_sequence": self.candidate_sequence,
            "min_sequence": self.min_sequence,
        }


def sign_targets(
    current: bytes | None,
    additions: list[TargetFile],
    signer: Signer,
    lifetime: timedelta = TARGETS_LIFETIME,
    rollback: dict[str, int | None] | None = None,
    rollouts: dict[str, RolloutPermit | None] | None = None,
) -> bytes:
    """The next targets.json: `current` plus `additions`, version bumped, signed by the operator's key.

    `rollback` sets (model -> lowest sequence devices may go back to) or clears (None) the operator's
    authorization to downgrade a model; without one, devices refuse anything older than they have run.
    `rollouts` sets (rollout id -> permit) or clears (None) the permits of staged rollouts."""
    if current:
        md: Metadata[Targets] = parse_metadata(current, Targets.type)
        md.signed.version += 1
    else:
        md = Metadata(Targets(version=1))
    for target in additions:
        md.signed.targets[target.path] = target
    if rollback:
        allowed = dict(md.signed.unrecognized_fields.get(ROLLBACK_FIELD, {}))
        for model, sequence in rollback.items():
            if sequence is None:
                allowed.pop(model, None)
            else:
                allowed[model] = {"min_sequence": int(sequence)}
        md.signed.unrecognized_fields[ROLLBACK_FIELD] = allowed
    if rollouts:
        permits = dict(md.signed.unrecognized_fields.get(ROLLOUT_FIELD, {}))
        for rollout_id, permit in rollouts.items():
            if permit is None:
                permits.pop(rollout_id, None)
            else:
                permits[rollout_id] = permit.to_json()
        md.signed.unrecognized_fields[ROLLOUT_FIELD] = permits
    md.signed.expires = utcnow() + lifetime
    md.signatures.clear()
    md.sign(signer)
    return md.to_bytes(_SERIALIZER)


def model_sequences(targets_json: bytes | None) -> dict[tuple[str, str], int]:
    """(model name, version) -> the sequence the operator signed for it (its order among versions)."""
    if not targets_json:
        return {}
    sequences: dict[tuple[str, str], int] = {}
    for target in parse_metadata(targets_json, Targets.type).signed.targets.values():
        model = (target.custom or {}).get("model", {})
        if isinstance(model, dict) and "name" in model:
            sequences[(str(model["name"]), str(model.get("version")))] = int(model.get("sequence", 0))
    return sequences


def rollback_floors(targets: Targets) -> dict[str, int]:
    """model -> the lowest sequence an operator has signed that devices may go back to."""
    allowed = targets.unrecognized_fields.get(ROLLBACK_FIELD, {})
    if not isinstance(allowed, dict):
        return {}
    floors = {}
    for model, entry in allowed.items():
        try:
            floors[str(model)] = int(entry["min_sequence"])
        except (KeyError, TypeError, ValueError):
            continue
    return floors


def rollout_permits(targets: Targets) -> dict[str, RolloutPermit]:
    """rollout id -> the permit the operator signed for it; malformed entries are ignored (they allow nothing)."""
    signed = targets.unrecognized_fields.get(ROLLOUT_FIELD, {})
    if not isinstance(signed, dict):
        return {}
    permits = {}
    for rollout_id, entry in signed.items():
        try:
            permits[str(rollout_id)] = RolloutPermit(
                model=str(entry["model"]),
                candidate_sequence=int(entry["candidate_sequence"]),
                min_sequence=int(entry["min_sequence"]),
            )
        except (KeyError, TypeError, ValueError):
            continue
    return permits


def target_file(path: str, data: bytes, custom: dict[str, Any]) -> TargetFile:
    target = TargetFile.from_data(path, data, ["sha256"])
    target.unrecognized_fields["custom"] = custom
    return target


# ---- server side: the online roles -----------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """Metadata files to store for one publication: name -> bytes, e.g. {"3.targets": ..., "timestamp": ...}."""

    files: dict[str, bytes]
    targets_version: int
    snapshot_version: int
    timestamp_version: int


class OnlineRoles:
    """What the server does with its online key: accept operator-signed targets and sign snapshot/timestamp.

    Pure: takes and returns bytes; the caller stores them.
    """

    def __init__(self, trusted_root: bytes, online_signer: Signer):
        self.root_md = parse_metadata(trusted_root, Root.type)
        root: Root = self.root_md.signed
        verify_role(root, Root.type, self.root_md)
        self.root = root
        self.signer = online_signer
        keyid = online_signer.public_key.keyid
        for role in (Snapshot.type, Timestamp.type):
            if keyid not in root.roles[role].keyids:
                raise SignatureError(
                    f"the server's online key {keyid[:12]} is not the {role} key in root.json"
                )

    def check_targets(self, data: bytes, current_version: int) -> Metadata[Targets]:
        """Raises SignatureError / InvalidRequestError when an operator's targets.json must not be published."""
        md = parse_metadata(data, Targets.type)
        verify_role(self.root, Targets.type, md)
        if md.signed.version != current_version + 1:
            raise InvalidRequestError(
                f"targets version {md.signed.version} does not follow the published {current_version}"
            )
        if md.signed.is_expired(utcnow()):
            raise SignatureError("targets metadata is already expired")
        return md

    def release(
        self,
        targets: Metadata[Targets] | None,
        *,
        targets_version: int,
        snapshot_version: int,
        timestamp_version: int,
        renew_snapshot: bool = False,
    ) -> Release:
        """The files of the next release, signed with the online key: the operator's new targets (if any),
        a new snapshot when targets changed or `renew_snapshot`, and always a new timestamp."""
        files: dict[str, bytes] = {}
        if targets is not None:
            targets_version = targets.signed.version
            files[f"{targets_version}.targets"] = targets.to_bytes(_SERIALIZER)
        if targets is not None or renew_snapshot:
            snapshot_version += 1
            snapshot = Metadata(
                Snapshot(
                    version=snapshot_version,
                    expires=utcnow() + SNAPSHOT_LIFETIME,
                    meta={"targets.json": MetaFile(version=targets_version)},
                )
            )
            snapshot.sign(self.signer)
            files[f"{snapshot_version}.snapshot"] = snapshot.to_bytes(_SERIALIZER)
        timestamp = Metadata(
            Timestamp(
                version=timestamp_version + 1,
                expires=utcnow() + TIMESTAMP_LIFETIME,
                snapshot_meta=MetaFile(version=snapshot_version),
            )
        )
        timestamp.sign(self.signer)
        files["timestamp"] = timestamp.to_bytes(_SERIALIZER)
        return Release(files, targets_version, snapshot_version, timestamp_version + 1)


def expires_at(data: bytes) -> datetime:
    return Metadata.from_bytes(data).signed.expires
