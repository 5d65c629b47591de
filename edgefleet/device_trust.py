"""The device's side of the signed repository: python-tuf's ngclient verifies metadata fetched over the
agent's gRPC channel, and a model file is checked against the signed target it belongs to.

`DeviceTrust` pins root.json at enrollment, refreshes metadata (ngclient persists the highest versions it has
seen, so older metadata is refused after a restart too) and answers what a target must be: from fresh
metadata before an install (`target`), from the metadata already held, re-verified, at every load of a local
copy (`local_target`). Blocking: the agent calls it from a worker thread.

Every chain of trust starts at `pinned-root.json`: the stored roots (ngclient's `root_history/N.root.json`,
and the `root.json` that points at the newest) are trusted only as far as each is signed by its
predecessor's threshold and its own (`chained_root`, python-tuf's own `update_root` rules). A root that
another process wrote or replaced breaks the chain there and is never trusted; the next refresh fetches the
real one again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.api.serialization import DeserializationError
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet
from tuf.ngclient.config import EnvelopeType

from edgefleet.durable import write_atomic
from edgefleet.errors import (
    HashMismatchError,
    MetadataExpiredError,
    MetadataRefusedError,
    TransportError,
    UnsignedTargetError,
)
from edgefleet.signing import (
    RolloutPermit,
    parse_metadata,
    rollback_floors,
    rollout_permits,
    utcnow,
    verify_role,
)

log = logging.getLogger("edgefleet.trust")

PINNED_ROOT = "pinned-root.json"
ROOT_HISTORY = "root_history"  # where ngclient keeps every root version it verified, as N.root.json

# Bounds for metadata a device accepts (bytes); far above what a fleet needs, far below what hurts a device.
DEVICE_UPDATER_CONFIG = UpdaterConfig(
    max_root_rotations=32,
    root_max_length=64 * 1024,
    timestamp_max_length=16 * 1024,
    snapshot_max_length=256 * 1024,
    targets_max_length=4 * 2**20,
    prefix_targets_with_hash=False,
)


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
        self.rollout_permits: dict[str, RolloutPermit] = {}  # likewise: rollout id -> signed permit

    @staticmethod
    def pin_root(metadata_dir: Path, trust_root: bytes) -> None:
        """First start: trust this root.json (checked to be self-signed) from now on."""
        md = parse_metadata(trust_root, Root.type)
        verify_role(md.signed, Root.type, md)
        Path(metadata_dir).mkdir(parents=True, exist_ok=True)
        os.chmod(metadata_dir, 0o700)
        write_atomic(Path(metadata_dir) / PINNED_ROOT, trust_root)

    def is_pinned(self) -> bool:
        return (self.metadata_dir / PINNED_ROOT).exists()

    def chained_root(self) -> tuple[Root, bytes]:
        """The newest root that chains from the pinned one, and its bytes: pinned-root.json, then each stored
        `root_history/N.root.json` for N = 2, 3, ... as long as it is version N and signed by both the
        threshold of the root before it and its own (python-tuf's `update_root`; expiry is not checked for
        a root on the way, as there). A stored root that does not chain, and a `root.json` that is not the
        chained root, are logged and ignored. Raises OSError (nothing pinned) or RepositoryError (a pinned
        root that does not verify)."""
        data = (self.metadata_dir / PINNED_ROOT).read_bytes()
        chain = TrustedMetadataSet(data, EnvelopeType.METADATA)
        while True:
            version = chain.root.version + 1
            try:
                stored = (self.metadata_dir / ROOT_HISTORY / f"{version}.root.json").read_bytes()
            except FileNotFoundError:
                break
            try:
                chain.update_root(stored)
            except tuf_exceptions.RepositoryError as e:
                log.error(
                    "stored root.json version %d does not chain from the pinned root, it is not trusted "
                    "(another process wrote it?): %s: %s", version, type(e).__name__, e,
                )  # fmt: skip
                break
            data = stored
        try:
            current = (self.metadata_dir / "root.json").read_bytes()
        except OSError:
            current = data
        if current != data:
            log.error(
                "metadata/root.json is not the root chained from the pinned one (version %d): ignored",
                chain.root.version,
            )
        return chain.root, data

    def target(self, target_path: str) -> TargetFile:
        """Refreshes metadata and returns the signed TargetFile. Raises MetadataError (the metadata is refused:
        unsigned, expired, a rollback), UnsignedTargetError (no such signed target) or TransportError."""
        try:
            # Never the stored root.json as it is: the root that chains from the pinned one.
            _, bootstrap = self.chained_root()
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
            self.rollout_permits = rollout_permits(verified.signed)
        except OSError as e:
            raise MetadataRefusedError(f"no pinned root on this device: {e}") from e
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
            raise UnsignedTargetError(f"{target_path} is not in the signed targets metadata")
        return info

    def local_target(self, target_path: str) -> TargetFile:
        """The signed TargetFile from the metadata this device already trusts, with no network (see
        `local_targets`). Raises MetadataRefusedError or UnsignedTargetError."""
        info = self.local_targets().get(target_path)
        if info is None:
            raise UnsignedTargetError(f"{target_path} is not in this device's signed targets metadata")
        return info

    def local_targets(self) -> dict[str, TargetFile]:
        """Every signed target in the metadata this device already trusts: targets.json checked against
        the keys and threshold of the root that chains from the pinned one (`chained_root`), now. Expiry is
        not the question here: this says what bytes were signed, not whether to update. Raises
        MetadataRefusedError (missing, malformed or unsigned metadata)."""
        try:
            root, _ = self.chained_root()
            targets = Metadata[Targets].from_file(str(self.metadata_dir / "targets.json"))
            root.verify_delegate(Targets.type, targets.signed_bytes, targets.signatures)
        except OSError as e:
            raise MetadataRefusedError(f"no trusted signed metadata on this device: {e}") from e
        except tuf_exceptions.UnsignedMetadataError as e:
            raise MetadataRefusedError(f"the signed metadata on this device is not signed: {e}") from e
        except tuf_exceptions.RepositoryError as e:
            raise MetadataRefusedError(f"the pinned root on this device does not verify: {e}") from e
        except (DeserializationError, ValueError, KeyError, TypeError) as e:
            raise MetadataRefusedError(f"the signed metadata on this device is malformed: {e}") from e
        return dict(targets.signed.targets)


def verify_file(target: TargetFile, path: Path) -> None:
    """Length and sha256 against the signed target. Raises HashMismatchError."""
    try:
        with open(path, "rb") as f:
            target.verify_length_and_hashes(f)
    except tuf_exceptions.LengthOrHashMismatchError as e:
        raise HashMismatchError(f"{target.path}: {e}") from e
