"""What a model target's signed custom fields say: the tensor signature, the golden check, the wire
encoding, the runtimes and hardware it is correct on, its measured figures and its sequence among the
model's versions. The operator signs them (`model_custom`); a device reads them back (`ModelTarget`).
"""

from __future__ import annotations

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
