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

import json
import os
from collections.abc import Callable, Iterator
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
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from edgefleet.durable import write_atomic
from edgefleet.errors import (
    HashMismatchError,
    InvalidRequestError,
    MetadataExpiredError,
    MetadataRefusedError,
    SignatureError,
    TransportError,
)
from edgefleet.values import ModelRef

ROOT_LIFETIME = timedelta(days=365)
TARGETS_LIFETIME = timedelta(days=365)
SNAPSHOT_LIFETIME = timedelta(days=7)
TIMESTAMP_LIFETIME = timedelta(days=1)

# Bounds for metadata a device accepts (bytes); far above what a fleet needs, far below what hurts a device.
DEVICE_UPDATER_CONFIG = UpdaterConfig(
    max_root_rotations=32,
    root_max_length=64 * 1024,
    timestamp_max_length=16 * 1024,
    snapshot_max_length=256 * 1024,
    targets_max_length=4 * 2**20,
    prefix_targets_with_hash=False,
)

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
        return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))  # type: ignore[arg-type]
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


def sign_targets(
    current: bytes | None,
    additions: list[TargetFile],
    signer: Signer,
    lifetime: timedelta = TARGETS_LIFETIME,
    rollback: dict[str, int | None] | None = None,
) -> bytes:
    """The next targets.json: `current` plus `additions`, version bumped, signed by the operator's key.

    `rollback` sets (model -> lowest sequence devices may go back to) or clears (None) the operator's
    authorization to downgrade a model; without one, devices refuse anything older than they have run."""
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


# ---- device side: verification with ngclient --------------------------------------------------------------


class CallbackFetcher(FetcherInterface):
    """Feeds ngclient from a function `name -> bytes` (the agent's gRPC GetMetadata call).

    The function raises FileNotFoundError for a file the server does not have (ngclient's "no newer root")
    and TransportError when the server cannot be reached.
    """

    PREFIX = "edgefleet:/metadata/"

    def __init__(self, get: Callable[[str], bytes]):
        self._get = get

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(self.PREFIX) or not url.endswith(".json"):
            raise tuf_exceptions.DownloadError(f"unexpected metadata url {url}")
        name = url[len(self.PREFIX) : -len(".json")]
        try:
            data = self._get(name)
        except FileNotFoundError as e:
            raise tuf_exceptions.DownloadHTTPError(f"{name} not found", 404) from e
        except TransportError as e:
            raise tuf_exceptions.DownloadError(str(e)) from e
        return iter([data])


class DeviceTrust:
    """The device's view of the signed repository: pins root.json, refreshes metadata, answers what a target
    must be. Blocking (ngclient is synchronous): call it from a worker thread."""

    def __init__(self, metadata_dir: Path, get_metadata: Callable[[str], bytes]):
        self.metadata_dir = Path(metadata_dir)
        self._fetcher = CallbackFetcher(get_metadata)
        self.rollback_floors: dict[str, int] = {}  # from the targets metadata verified by the last refresh

    @staticmethod
    def pin_root(metadata_dir: Path, trust_root: bytes) -> None:
        """First start: trust this root.json (checked to be self-signed) from now on."""
        md = parse_metadata(trust_root, Root.type)
        verify_role(md.signed, Root.type, md)
        Path(metadata_dir).mkdir(parents=True, exist_ok=True)
        os.chmod(metadata_dir, 0o700)
        write_atomic(Path(metadata_dir) / "pinned-root.json", trust_root)

    def is_pinned(self) -> bool:
        return (self.metadata_dir / "pinned-root.json").exists()

    def target(self, target_path: str) -> TargetFile:
        """Refreshes metadata and returns the signed TargetFile. Raises SignatureError (the metadata is bad:
        unsigned, expired, a rollback, or no such target) or TransportError (could not fetch)."""
        bootstrap = None
        if not (self.metadata_dir / "root.json").exists():
            bootstrap = (self.metadata_dir / "pinned-root.json").read_bytes()
        try:
            updater = Updater(
                str(self.metadata_dir),
                CallbackFetcher.PREFIX,
                fetcher=self._fetcher,
                config=DEVICE_UPDATER_CONFIG,
                bootstrap=bootstrap,
            )
            updater.refresh()
            info = updater.get_targetinfo(target_path)
            # ngclient persisted exactly what it just verified: read the operator's rollback authorizations.
            verified = Metadata[Targets].from_file(str(self.metadata_dir / "targets.json"))
            self.rollback_floors = rollback_floors(verified.signed)
        except tuf_exceptions.DownloadError as e:
            raise TransportError(f"metadata download failed: {e}") from e
        except tuf_exceptions.ExpiredMetadataError as e:
            raise MetadataExpiredError(
                f"signed metadata has expired ({e}); this device's clock reads {utcnow().isoformat()}: "
                "if that is wrong, fix the clock; otherwise the server is serving stale metadata"
            ) from e
        except tuf_exceptions.RepositoryError as e:
            raise MetadataRefusedError(f"signed metadata refused: {type(e).__name__}: {e}") from e
        except (DeserializationError, ValueError, KeyError, TypeError) as e:
            raise MetadataRefusedError(f"signed metadata refused: malformed: {e}") from e
        if info is None:
            raise SignatureError(f"{target_path} is not in the signed targets metadata")
        return info


def verify_file(target: TargetFile, path: Path) -> None:
    """Length and sha256 against the signed target. Raises HashMismatchError."""
    try:
        with open(path, "rb") as f:
            target.verify_length_and_hashes(f)
    except tuf_exceptions.LengthOrHashMismatchError as e:
        raise HashMismatchError(f"{target.path}: {e}") from e


def custom_of(target: TargetFile) -> dict[str, Any]:
    custom = target.custom
    if not isinstance(custom, dict):
        raise SignatureError(f"{target.path}: custom metadata is not an object")
    return custom


# ---- what a model target's custom fields say ---------------------------------------------------------------

# Measured figures copied from the server's details into the signed metadata (the rest is recomputable).
METRIC_KEYS = (
    "recipe",
    "judged_by",
    "size_bytes",
    "accuracy",
    "accuracy_delta_points",
    "max_abs_error",
    "mean_abs_error",
    "latency_ms",
    "peak_memory_bytes",
    "peak_memory_bytes_by_runtime",
    "model_memory_bytes",
    "model_memory_bytes_by_runtime",
    "runtimes_failed",
    "excluded",
)


def canonical_safe(value: Any) -> Any:
    """TUF signs canonical JSON, which has no floats: write them as decimal strings (readers use float())."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): canonical_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical_safe(v) for v in value]
    return value


def model_custom(
    name: str, version: str, variant: str, details: dict[str, Any], sequence: int = 0
) -> dict[str, Any]:
    """The custom fields the operator signs for one model file, from the server's measured details."""
    return canonical_safe(
        {
            "model": {"name": name, "version": version, "variant": variant, "sequence": sequence},
            "signature": details["signature"],
            "golden": details["golden"],
            "wire": {
                "encoding": details.get("wire_encoding", "identity"),
                "length": int(details["wire_bytes"]),
                "sha256": details["wire_sha256"],
            },
            "runtimes": list(details.get("runtimes_ok", [])),
            "hardware_classes": list(details.get("hardware_classes", [])),
            "metrics": {k: details[k] for k in METRIC_KEYS if k in details},
        }
    )


@dataclass(frozen=True)
class ModelTarget:
    """A verified TargetFile read as a model: everything the device checks before a model may serve."""

    path: str
    length: int
    sha256: str
    name: str
    version: str
    variant: str
    signature: Any  # edgefleet.modelinfo.ModelSignature
    golden: Any  # edgefleet.modelinfo.Golden
    wire_encoding: str
    wire_length: int
    wire_sha256: str
    runtimes: tuple[str, ...]
    hardware_classes: tuple[str, ...]
    target: TargetFile
    sequence: int = 0  # the version's order among the model's versions, signed by the operator

    @classmethod
    def from_target(cls, target: TargetFile) -> ModelTarget:
        """Raises SignatureError when the signed custom fields are missing or malformed."""
        from edgefleet.errors import ModelError
        from edgefleet.modelinfo import Golden, ModelSignature

        custom = custom_of(target)
        try:
            model, wire = custom["model"], custom["wire"]
            wire_length = int(wire["length"])
            if not 0 < wire_length <= 2 * 2**30 or not 0 < target.length <= 2 * 2**30:
                raise ValueError("length out of range")
            return cls(
                path=target.path,
                length=target.length,
                sha256=target.hashes["sha256"],
                name=str(model["name"]),
                version=str(model["version"]),
                variant=str(model["variant"]),
                signature=ModelSignature.from_json(custom["signature"]),
                golden=Golden.from_json(custom["golden"]),
                wire_encoding=str(wire["encoding"]),
                wire_length=wire_length,
                wire_sha256=str(wire["sha256"]),
                runtimes=tuple(str(r) for r in custom.get("runtimes", [])),
                hardware_classes=tuple(str(h) for h in custom.get("hardware_classes", [])),
                target=target,
                sequence=int(model.get("sequence", 0)),
            )
        except (KeyError, TypeError, ValueError, ModelError) as e:
            raise SignatureError(f"{target.path}: signed model fields are malformed: {e}") from e

    def ref(self) -> ModelRef:
        return ModelRef(self.path, self.name, self.version, self.variant, self.sha256, self.length)

    def target_json(self) -> bytes:
        return json.dumps({self.path: self.target.to_dict()}).encode()

    @classmethod
    def from_target_json(cls, data: bytes) -> ModelTarget:
        ((path, info),) = json.loads(data).items()
        return cls.from_target(TargetFile.from_dict(info, path))
