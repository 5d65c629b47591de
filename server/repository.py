"""The model repository: uploads (checked and measured in a sandbox, with their compressed variants), the
signed TUF metadata, and publishing.

Data flow of a version:
    UploadModel -> blob + ModelRecord per variant (unsigned) -> PublishTargets (operator-signed targets.json)
    -> snapshot + timestamp (online key) -> the files are marked signed and can be deployed and downloaded

The server holds only the online key: it can refresh snapshot and timestamp but not add or change a model.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import numpy as np

from edgefleet import sandbox, signing
from edgefleet.errors import ConflictError, InvalidRequestError, ModelError, NotFoundError, SignatureError
from edgefleet.model_targets import GoldenFile, golden_path, is_golden_path
from edgefleet.modelinfo import describe_model_file, inspect_model
from edgefleet.selectors import check_name
from edgefleet.server.storage.interfaces import BlobStore, FleetStore
from edgefleet.server.storage.records import ModelRecord, RepoVersions, now_ms

log = logging.getLogger("edgefleet.server")

ORIGINAL_VARIANT = "float32"
_METADATA_NAME = re.compile(r"root|timestamp|[1-9][0-9]{0,8}\.(root|snapshot|targets)")  # fullmatch


def target_path(name: str, version: str, variant: str = ORIGINAL_VARIANT) -> str:
    return f"{name}/{version}/{variant}.tflite"


NO_EVAL_NOTE = "generated inputs, no labels given: judged against the float model's own outputs"
Described = tuple[str, bytes, dict[str, Any], dict[str, Any], bytes, bytes]


def describe_upload(
    content: bytes,
    eval_npz: bytes,
    calibration_npz: bytes,
    tolerance: float,
    validate_runtime: str,
    measure_without_eval: bool = False,
) -> list[Described]:
    """In the sandbox: (variant, model bytes, tensor signature, measured details, wire bytes, golden file
    bytes or b"" when the golden data is inline) for the upload and, with an eval set, each compressed
    variant (or, with `measure_without_eval`, each variant measured on generated inputs against the float
    model's own outputs). Every file's golden input is the same: the eval set's first row, else generated
    from the pushed model. Raises ModelError / InvalidRequestError."""
    signature = inspect_model(content, validate_runtime)
    if not eval_npz and not measure_without_eval:
        original = describe_model_file(content, original=None)
        return [
            (
                ORIGINAL_VARIANT,
                content,
                signature.to_json(),
                original.to_details(),
                content,
                original.golden_npz,
            )
        ]
    from edgefleet.server import compression  # heavy (ai-edge-quantizer): only when compressing

    eval_set = compression.load_eval_npz(eval_npz) if eval_npz else None
    calibration = compression.load_eval_npz(calibration_npz).x if calibration_npz else None
    golden_inputs = _first_rows(eval_set, content) if eval_set is not None else None
    described: list[Described] = []
    for variant in compression.build_variants(
        content, eval_set, tolerance_points=tolerance, calibration=calibration
    ):
        details = dict(variant.details)
        if eval_set is None:
            details["measured_on"] = NO_EVAL_NOTE
        try:
            description = describe_model_file(variant.model, original=content, golden_inputs=golden_inputs)
            details.update(description.to_details())
            golden_npz = description.golden_npz
        except ModelError as e:
            if variant.name == ORIGINAL_VARIANT:
                raise
            # A variant that breaks on the golden input (a quantization that overflows to NaN on a CNN) is
            # not shipped; the push goes on with the ones that hold.
            log.warning("variant %s of the upload dropped: %s", variant.name, e)
            continue
        described.append(
            (
                variant.name,
                variant.model,
                inspect_model(variant.model, validate_runtime).to_json(),
                details,
                variant.wire,
                golden_npz,
            )
        )
    return described


def _first_rows(eval_set: Any, content: bytes) -> list[np.ndarray]:
    """The operator's own first eval example, one tensor per model input, as the golden input."""
    from edgefleet.runtime import LITERT
    from edgefleet.server.compression.build import describe_io

    io_ = describe_io(content, LITERT)
    bound = eval_set.bind(io_)
    return [
        np.ascontiguousarray(bound.inputs[t.name][:1]).astype(t.dtype).reshape((1, *t.shape[1:]))
        for t in io_.inputs
    ]


def pushed_with(
    eval_npz: bytes, calibration_npz: bytes, tolerance_points: float, measure_without_eval: bool = False
) -> dict[str, Any]:
    """What besides the model's bytes decides a version's variants: a re-push must bring the same."""
    inputs: dict[str, Any] = {
        "eval_sha256": hashlib.sha256(eval_npz).hexdigest() if eval_npz else "",
        "calibration_sha256": hashlib.sha256(calibration_npz).hexdigest() if calibration_npz else "",
        "tolerance_points": float(tolerance_points),
    }
    if measure_without_eval and not eval_npz:  # only when set: records from before compare equal
        inputs["measure_without_eval"] = True
    return inputs


class Repository:
    def __init__(
        self,
        store: FleetStore,
        blobs: BlobStore,
        online: signing.OnlineRoles,
        trust_root: bytes,
        validate_runtime: str,
        max_model_bytes: int,
        describe_timeout_s: float = 300,
        describe_memory_bytes: int = 8 * 2**30,
    ):
        self.store = store
        self.blobs = blobs
        self.online = online
        self.trust_root = trust_root
        self.validate_runtime = validate_runtime
        self.max_model_bytes = max_model_bytes
        self.describe_timeout_s = describe_timeout_s
        self.describe_memory_bytes = describe_memory_bytes

    # ---- signed metadata ---------------------------------------------------------------------------------

    async def init_repository(self) -> None:
        """First start: store root.json v1 and an empty timestamp. Later starts: check the root is the same."""
        versions = await asyncio.to_thread(self.store.repo_versions)
        if versions.root == 0:
            files = {"1.root": self.trust_root, "root": self.trust_root}
            await self._put_metadata(files, RepoVersions(root=1), versions)
        elif await asyncio.to_thread(self.store.get_metadata, "1.root") != self.trust_root:
            raise SignatureError("this server's database was created with another root.json; use that one")

    async def renew_online_metadata(self, margin: timedelta = timedelta(hours=12)) -> bool:
        """Re-signs timestamp (and snapshot) before they expire, so devices never see stale metadata."""
        versions = await asyncio.to_thread(self.store.repo_versions)
        if versions.targets == 0:
            return False
        soon = signing.utcnow() + margin
        ts = signing.expires_at(await asyncio.to_thread(self.store.get_metadata, "timestamp"))
        snapshot = await asyncio.to_thread(self.store.get_metadata, f"{versions.snapshot}.snapshot")
        snap = signing.expires_at(snapshot)
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
        await self._put_metadata(release.files, new, versions)
        return True

    async def current_metadata(self, role: str) -> bytes:
        """The newest root or targets metadata (for the operator to extend and sign)."""
        versions = await asyncio.to_thread(self.store.repo_versions)
        version = versions.root if role == "root" else versions.targets
        if version == 0:
            raise NotFoundError(f"no {role} metadata published yet")
        return await asyncio.to_thread(self.store.get_metadata, f"{version}.{role}")

    async def get_metadata(self, name: str) -> bytes:
        if not _METADATA_NAME.fullmatch(name):
            raise InvalidRequestError(f"bad metadata name {name!r}")
        if name == "root":
            versions = await asyncio.to_thread(self.store.repo_versions)
            name = f"{versions.root}.root"
        return await asyncio.to_thread(self.store.get_metadata, name)

    async def publish_targets(self, data: bytes) -> RepoVersions:
        """Accepts operator-signed targets.json whose every target is a file the server holds."""
        versions = await asyncio.to_thread(self.store.repo_versions)
        md = self.online.check_targets(data, versions.targets)
        for path, target in md.signed.targets.items():
            record = await self.golden_file(path) if is_golden_path(path) else await self.model(path)
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
        await self._put_metadata(release.files, new, versions)
        await asyncio.to_thread(self.store.mark_signed, list(md.signed.targets))
        log.info("published targets v%d (%d files)", new.targets, len(md.signed.targets))
        return new

    async def _put_metadata(self, files: dict[str, bytes], new: RepoVersions, expected: RepoVersions) -> None:
        try:
            await asyncio.to_thread(self.store.put_metadata, files, new, expected)
        except ConflictError as e:
            raise ConflictError("the signed metadata changed meanwhile; fetch it again and retry") from e

    # ---- models ------------------------------------------------------------------------------------------

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
        measure_without_eval: bool = False,
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
        inputs = pushed_with(eval_npz, calibration_npz, tolerance_points, measure_without_eval)
        existing = sorted(
            (m for m in await self.list_models(name) if m.version == version),
            key=lambda m: m.variant != ORIGINAL_VARIANT,
        )
        if existing:
            if existing[0].sha256 != sha256:
                raise ConflictError(
                    f"{name} {version} already exists with other content; versions are immutable: push a new version"
                )
            # Records from before this was kept say nothing about their inputs: taken as the same.
            if existing[0].details.get("pushed_with", inputs) != inputs:
                raise ConflictError(
                    f"{name} {version} was pushed with another eval set, calibration set or tolerance; versions "
                    "are immutable: push a new version"
                )
            # Re-pushing the same bytes with the same inputs (e.g. after a failed signing step) changes nothing.
            async for _ in chunks:
                pass
            return existing
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
            self._describe,
            name,
            version,
            content,
            eval_npz,
            calibration_npz,
            tolerance_points,
            measure_without_eval,
        )
        records[0].details["pushed_with"] = inputs  # what a re-push of this version is compared with
        for record in records:
            try:
                await asyncio.to_thread(self.store.add_model, record)
            except ConflictError as e:
                raise ConflictError(
                    f"{record.target_path} already exists; versions are immutable, push a new one"
                ) from e
        return records

    def _describe(
        self,
        name: str,
        version: str,
        content: bytes,
        eval_npz: bytes,
        calibration_npz: bytes,
        tolerance: float,
        measure_without_eval: bool = False,
    ) -> list[ModelRecord]:
        """Blocking: validates and measures the upload (and builds its variants) in a sandboxed child
        process, since the interpreter must not see untrusted bytes inside the server. Runs in a thread."""
        described = sandbox.run(
            "edgefleet.server.repository:describe_upload",
            content,
            eval_npz,
            calibration_npz,
            tolerance,
            self.validate_runtime,
            measure_without_eval,
            timeout=self.describe_timeout_s,
            memory_limit=self.describe_memory_bytes,
        )
        records = [
            self._record(name, version, variant, model, signature, details, wire, golden_npz)
            for variant, model, signature, details, wire, golden_npz in described
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
        golden_npz: bytes = b"",
    ) -> ModelRecord:
        sha = self.blobs.put_bytes(model)
        if golden_npz:
            # Golden data too large to ride inline: a content-addressed file signed with the model.
            golden_sha = self.blobs.put_bytes(golden_npz)
            details.pop("golden_npz_bytes", None)
            details.pop("golden_npz_sha256", None)
            details["golden_file"] = GoldenFile(
                golden_path(name, version, golden_sha), golden_sha, len(golden_npz)
            ).to_json()
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
        return await asyncio.to_thread(self.store.list_models, name)

    async def model(self, path: str) -> ModelRecord:
        """Raises NotFoundError, saying where to look, for a file the server does not hold."""
        try:
            return await asyncio.to_thread(self.store.get_model, path)
        except NotFoundError as e:
            raise NotFoundError(f"no model file {path!r}; see `edgefleet model list`") from e

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

    async def golden_file(self, path: str, signed_only: bool = False) -> ModelRecord:
        """A golden file as the record of a downloadable file (it is served like a model's identity wire
        bytes), from the model file whose details name it. Raises NotFoundError."""
        name, version, _ = path.split("/")
        for m in await self.list_models(name):
            golden = m.details.get("golden_file")
            if m.version == version and golden and golden["path"] == path and (m.signed or not signed_only):
                sha, length = str(golden["sha256"]), int(golden["length"])
                details = {"wire_sha256": sha, "wire_bytes": length, "wire_encoding": "identity"}
                return ModelRecord(
                    path, name, version, "golden", sha, length, {}, m.created_ms, m.signed, details
                )
        raise NotFoundError(f"no golden file {path!r}; see `edgefleet model show`")

    def read_golden(self, record: ModelRecord) -> bytes:
        """The golden file a model record names (b"" when its golden data is inline)."""
        golden = record.details.get("golden_file")
        return self.blobs.path(golden["sha256"]).read_bytes() if golden else b""

    async def model_for_download(self, path: str) -> ModelRecord:
        if is_golden_path(path):
            return await self.golden_file(path, signed_only=True)
        record = await self.model(path)
        if not record.signed:
            raise NotFoundError(f"{path} is not published")
        return record
