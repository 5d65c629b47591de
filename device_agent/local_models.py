"""The model files kept on the device, and the candidate test every model passes before it serves.

All blocking (hashing, decoding, starting a process): the async code calls these through
`asyncio.to_thread`.

    downloads/<sha>.part -> `finish_file`: wire sha256, bounded decode, length + sha256 -> models/<sha>.tflite
    a ModelRef -> `local_target`: its signed description from the metadata this device trusts, re-verified
                  (never a description kept beside the file: anyone who can write the folder could plant one)
    `test_candidate`: the file read once into sealed memory and checked (`sealed_model`), loaded from exactly
                  those bytes in its own process (time and memory limited), signed tensors, signed golden output
    golden data too large to sign inline is a signed target file of its own, downloaded beside the model
                  (downloads/<sha>.part -> `finish_golden` -> models/<sha>.npz) and read once per use,
                  its bytes checked against the model target's signed sha256 and length (`with_golden`)

Every load (an update's candidate, the model at start, a rollback, a worker restart) goes through
`test_candidate`, so nothing runs that was not checked against the signed metadata in the same breath.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from tuf.api.metadata import TargetFile

from edgefleet import errors, wire
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.faults import Faults
from edgefleet.agent.sealed_model import SealedModel
from edgefleet.agent.serving import ModelWorker
from edgefleet.agent.state import StateStore
from edgefleet.device_trust import DeviceTrust, verify_file
from edgefleet.durable import commit_file, fsync_dir
from edgefleet.model_targets import ModelTarget
from edgefleet.modelinfo import check_signature
from edgefleet.values import ModelRef

log = logging.getLogger("edgefleet.agent")

# What a local copy can fail with: bad or missing bytes, unverifiable metadata, the disk.
UNUSABLE = (errors.EdgefleetError, ValueError, OSError)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class LocalModels:
    def __init__(
        self, config: AgentConfig, runtime: str, store: StateStore, trust: DeviceTrust, faults: Faults
    ):
        self.config = config
        self.runtime = runtime
        self.store = store
        self.trust = trust
        self.faults = faults

    def local_target(self, ref: ModelRef) -> ModelTarget:
        """What `ref` must be, from the signed metadata this device holds (checked again now). Raises
        MetadataError or SignatureError when it cannot be verified, HashMismatchError when the signed target
        is not the version `ref` names."""
        target = ModelTarget.from_target(self.trust.local_target(ref.target_path))
        if target.sha256 != ref.sha256:
            raise errors.HashMismatchError(
                f"{ref.target_path}: the signed target is not the version kept here"
            )
        return self.with_golden(target)

    # ---- golden files ------------------------------------------------------------------------------------

    def golden_path(self, target: ModelTarget) -> Path:
        assert target.golden_file is not None
        return self.store.folder / "models" / f"{target.golden_file.sha256}.npz"

    def with_golden(self, target: ModelTarget) -> ModelTarget:
        """`target` with its golden data, read from the local golden file when it is not inline: the bytes
        are read once, and those bytes are hashed and parsed. Raises HashMismatchError (missing, or not the
        signed bytes), ModelError (signed bytes that do not parse)."""
        if target.golden is not None or target.golden_file is None:
            return target
        path = self.golden_path(target)
        try:
            with open(path, "rb") as f:
                data = f.read(target.golden_file.length + 1)
        except FileNotFoundError:
            raise errors.HashMismatchError(f"{target.golden_file.path}: the local copy is missing") from None
        return target.with_golden(data)

    def has_golden(self, target: ModelTarget) -> bool:
        """Whether the signed golden file is already here (a file that is not the signed one is deleted)."""
        if target.golden_file is None:
            return True
        try:
            self.with_golden(target)
            return True
        except errors.HashMismatchError:
            self.golden_path(target).unlink(missing_ok=True)
            return False

    def check_golden_target(self, target: ModelTarget, signed: TargetFile) -> None:
        """The golden file's own signed target must be what the model's signed fields name."""
        assert target.golden_file is not None
        if (
            signed.length != target.golden_file.length
            or signed.hashes.get("sha256") != target.golden_file.sha256
        ):
            raise errors.HashMismatchError(
                f"{target.golden_file.path}: its signed target differs from what {target.path} names"
            )

    def finish_golden(self, target: ModelTarget) -> None:
        """Checks the downloaded golden file against the signed sha256 and length and moves it into place
        durably; deletes the partial file when it is not the signed bytes."""
        assert target.golden_file is not None
        part = self.store.download_path(target.golden_file.sha256)
        final = self.golden_path(target)
        try:
            data = part.read_bytes()
            target.with_golden(data)  # hashed and parsed: the bytes that go into place are the signed ones
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        tmp = final.with_suffix(".tmp")
        tmp.write_bytes(data)
        commit_file(tmp, final)
        part.unlink(missing_ok=True)
        fsync_dir(part.parent)

    def usable(self, ref: ModelRef) -> bool:
        """Whether the local copy verifies; one that does not is deleted (it is fetched again if needed)."""
        try:
            target = self.local_target(ref)
            SealedModel.verified(
                self.store.model_path(target.sha256), target.path, target.length, target.sha256
            ).close()
            return True
        except UNUSABLE as e:
            log.error("local copy of %s refused, it will not run: %s", ref.target_path, e)
            self.forget(ref)
            return False

    def verified_on_disk(self) -> list[ModelTarget]:
        """The model files here whose bytes are a target of the signed metadata this device holds (each read
        and checked now); what a damaged state file can be rebuilt from. Files that are not are left alone:
        nothing runs them, and the next prune deletes them."""
        try:
            signed = {t.hashes.get("sha256"): t for t in self.trust.local_targets().values()}
        except errors.EdgefleetError:
            return []
        found = []
        for path in sorted((self.store.folder / "models").glob("*.tflite")):
            info = signed.get(path.stem)
            if info is None:
                continue
            try:
                target = ModelTarget.from_target(info)
                SealedModel.verified(path, target.path, target.length, target.sha256).close()
            except UNUSABLE:
                continue
            found.append(target)
        return found

    def forget(self, ref: ModelRef) -> None:
        self.store.model_path(ref.sha256 or "x").unlink(missing_ok=True)

    def start(self, ref: ModelRef) -> tuple[ModelTarget, ModelWorker]:
        """The local copy of `ref`, verified and tested as a candidate: (its target, a warm worker)."""
        target = self.local_target(ref)
        return target, self.test_candidate(target)

    def verifies(self, target: ModelTarget, path: Path) -> bool:
        """Whether the file already here is the signed one (so nothing needs downloading); a file that is not
        is deleted. The bytes are checked again, sealed, when they load."""
        try:
            verify_file(target.target, path)
            return True
        except errors.HashMismatchError:
            path.unlink(missing_ok=True)
            return False

    def finish_file(self, target: ModelTarget) -> None:
        """Checks the wire bytes, decodes them (bounded by the signed length), checks the model's length and
        sha256, and moves it into place durably. Deletes the partial file when anything is bad."""
        part = self.store.download_path(target.sha256)
        final = self.store.model_path(target.sha256)
        tmp = final.with_suffix(".tmp")
        try:
            if sha256_file(part) != target.wire_sha256:
                # Not the signed bytes: a tampered blob, a spliced resume. Deleted, so the retry starts at 0.
                raise errors.HashMismatchError(
                    f"{target.path}: downloaded bytes do not match the signed sha256"
                )
            try:
                self._decode(target, part, tmp)
            except errors.HashMismatchError as e:
                # The signed wire bytes themselves decode wrong: a property of the signed artifact.
                raise errors.ModelError(f"{target.path}: the signed wire bytes do not decode: {e}") from e
            self.faults.at("verified")
        except BaseException:
            part.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
            raise
        commit_file(tmp, final)
        part.unlink(missing_ok=True)
        fsync_dir(part.parent)
        self.faults.at("written")

    @staticmethod
    def _decode(target: ModelTarget, part: Path, tmp: Path) -> None:
        """Decodes `part` into `tmp`, hashing what it writes (not a re-read of `tmp`)."""
        decoder = wire.BoundedDecoder(target.wire_encoding, target.length)
        digest = hashlib.sha256()
        length = 0
        with open(part, "rb") as src, open(tmp, "wb") as dst:
            while True:
                chunk = src.read(1 << 20)
                data = decoder.feed(chunk) if chunk else decoder.finish()
                digest.update(data)
                length += len(data)
                dst.write(data)
                if not chunk:
                    break
        if length != target.length or digest.hexdigest() != target.sha256:
            raise errors.HashMismatchError(f"decoded to {length} bytes that differ from the signed ones")

    def new_worker(self, model_length: int, low_priority: bool = False) -> ModelWorker:
        """Start, restart and rollback load at normal priority: nothing serves then, or the operator wants
        the old model back now. Only an update's candidate loads at a lower one (`ModelWorker`)."""
        # The candidate's own address-space limit: generous for the runtime (~150 MiB) and the model, far
        # below what a model built to exhaust memory would take.
        limit = self.config.worker_memory_limit_bytes or 1024 * 2**20 + 4 * model_length
        return ModelWorker(
            None,
            self.runtime,
            num_threads=self.config.num_threads,
            memory_limit_bytes=limit,
            low_priority=low_priority,
        )

    def test_candidate(self, target: ModelTarget, worker: ModelWorker | None = None) -> ModelWorker:
        """Reads the local copy once into sealed memory, checks its length and sha256 against the signed
        target, loads exactly those bytes in its own process (time and memory limited), checks its tensors
        against the signed signature and its output on the signed golden input. The warm worker is returned.
        Raises HashMismatchError when the bytes are not the signed ones (nothing ran), ModelError when the
        verified bytes do not load or their output is wrong."""
        worker = worker or self.new_worker(target.length)
        try:
            target = self.with_golden(target)
            with SealedModel.verified(
                self.store.model_path(target.sha256), target.path, target.length, target.sha256
            ) as sealed:
                self.faults.at("sealed")
                signature = worker.load(
                    sealed, timeout=self.config.candidate_timeout_s, warm_inputs=target.golden.inputs
                )
            check_signature(signature, target.signature)
            if worker.warm_error is not None:
                raise errors.ModelError(f"the candidate fails on its golden input: {worker.warm_error}")
            assert worker.warm_outputs is not None
            target.golden.check(worker.warm_outputs)
        except BaseException:
            worker.kill()
            raise
        return worker

    def prune(self) -> None:
        """Deletes model files and downloads that are neither the current model, the previous one nor the
        shadow candidate."""
        state = self.store.state
        kept = [r for r in (state.current, state.previous, state.shadow) if r]
        keep = {r.sha256 for r in kept}
        for ref in kept:
            try:  # their golden files stay too
                golden = ModelTarget.from_target(self.trust.local_target(ref.target_path)).golden_file
            except UNUSABLE:
                continue
            if golden is not None:
                keep.add(golden.sha256)
        self.store.prune_models(keep)
