"""What a model target's signed custom fields say: the tensor signature, the golden check, the wire
encoding, the runtimes and hardware it is correct on, its measured figures and its sequence among the
model's versions. The operator signs them (`model_custom`); a device reads them back (`ModelTarget`).

The golden check is either inline (``golden``: small tensors, base64 in the JSON) or a signed target file of
its own (``golden_file``: path, sha256 and length of an .npz, `modelinfo.Golden.to_npz`), content-addressed
as ``<model>/<version>/golden-<sha256[:16]>.npz`` and signed in the same targets.json as the model. A device
fetches and verifies that file like a model, then reads it with `ModelTarget.with_golden`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tuf.api.metadata import TargetFile

from edgefleet.errors import SignatureError
from edgefleet.values import ModelRef

# ---- what a model target's custom fields say ---------------------------------------------------------------


def custom_of(target: TargetFile) -> dict[str, Any]:
    custom = target.custom
    if not isinstance(custom, dict):
        raise SignatureError(f"{target.path}: custom metadata is not an object")
    return custom


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
            **_golden_field(details),
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


def golden_path(name: str, version: str, sha256: str) -> str:
    return f"{name}/{version}/golden-{sha256[:16]}.npz"


def is_golden_path(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 3 and parts[2].startswith("golden-") and parts[2].endswith(".npz")


@dataclass(frozen=True)
class GoldenFile:
    """Where a model's golden data is, when it does not fit inline: a signed target file of its own."""

    path: str
    sha256: str
    length: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "length": self.length}

    @classmethod
    def from_json(cls, data: Any) -> GoldenFile:
        """Raises ValueError / KeyError / TypeError when malformed."""
        from edgefleet.modelinfo import MAX_GOLDEN_NPZ_BYTES

        golden = cls(str(data["path"]), str(data["sha256"]), int(data["length"]))
        if not is_golden_path(golden.path) or len(golden.sha256) != 64:
            raise ValueError(f"golden file {golden.path!r} is not a golden target")
        if not 0 < golden.length <= MAX_GOLDEN_NPZ_BYTES:
            raise ValueError(f"golden file length {golden.length} out of range")
        return golden


def _golden_field(details: dict[str, Any]) -> dict[str, Any]:
    if "golden_file" in details:
        return {"golden_file": GoldenFile.from_json(details["golden_file"]).to_json()}
    return {"golden": details["golden"]}


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
    golden: Any  # edgefleet.modelinfo.Golden; None until `with_golden` when the golden data is a file
    wire_encoding: str
    wire_length: int
    wire_sha256: str
    runtimes: tuple[str, ...]
    hardware_classes: tuple[str, ...]
    target: TargetFile
    sequence: int = 0  # the version's order among the model's versions, signed by the operator
    golden_file: GoldenFile | None = None  # the signed golden file, when the golden data is not inline

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
                golden=Golden.from_json(custom["golden"]) if "golden" in custom else None,
                wire_encoding=str(wire["encoding"]),
                wire_length=wire_length,
                wire_sha256=str(wire["sha256"]),
                runtimes=tuple(str(r) for r in custom.get("runtimes", [])),
                hardware_classes=tuple(str(h) for h in custom.get("hardware_classes", [])),
                target=target,
                sequence=int(model.get("sequence", 0)),
                golden_file=None if "golden" in custom else GoldenFile.from_json(custom["golden_file"]),
            )
        except (KeyError, TypeError, ValueError, ModelError) as e:
            raise SignatureError(f"{target.path}: signed model fields are malformed: {e}") from e

    def with_golden(self, npz: bytes) -> ModelTarget:
        """This target with its golden data read from the golden file's bytes, which must be the signed ones.
        Raises HashMismatchError (not the signed bytes), ModelError (they do not parse)."""
        import hashlib

        from edgefleet.errors import HashMismatchError
        from edgefleet.modelinfo import Golden

        if self.golden_file is None:
            return self
        if len(npz) != self.golden_file.length or hashlib.sha256(npz).hexdigest() != self.golden_file.sha256:
            raise HashMismatchError(f"{self.golden_file.path}: not the signed golden data of {self.path}")
        return dataclasses.replace(self, golden=Golden.from_npz(npz))

    def ref(self) -> ModelRef:
        return ModelRef(self.path, self.name, self.version, self.variant, self.sha256, self.length)
