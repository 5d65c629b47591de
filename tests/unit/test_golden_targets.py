"""A model target's golden data as a signed file of its own: what the operator signs, what a device reads
back, and what it refuses."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest

from edgefleet import model_targets, modelinfo, signing
from edgefleet.errors import HashMismatchError, ModelError, SignatureError

GOLDEN = modelinfo.Golden(
    (np.arange(6000, dtype=np.float32).reshape(1, 6000),),
    (np.ones((1, 3), np.float32),),
    input_names=("features",),
    output_names=("scores",),
)


def _details(npz: bytes) -> dict[str, Any]:
    sha = hashlib.sha256(npz).hexdigest()
    return {
        "signature": {"inputs": [], "outputs": []},
        "golden_file": {
            "path": model_targets.golden_path("wide", "1", sha),
            "sha256": sha,
            "length": len(npz),
        },
        "wire_bytes": 10,
        "wire_sha256": "0" * 64,
    }


def _target(custom: dict[str, Any]) -> signing.TargetFile:
    target = signing.TargetFile(length=10, hashes={"sha256": "0" * 64}, path="wide/1/float32.tflite")
    target.unrecognized_fields["custom"] = custom
    return target


def test_golden_data_over_the_inline_limit_is_a_file_named_by_the_signed_fields() -> None:
    assert not GOLDEN.fits_inline and GOLDEN.size_bytes <= modelinfo.MAX_GOLDEN_BYTES
    npz = GOLDEN.to_npz()
    custom = model_targets.model_custom("wide", "1", "float32", _details(npz))
    assert "golden" not in custom and custom["golden_file"]["path"].startswith("wide/1/golden-")
    target = model_targets.ModelTarget.from_target(_target(custom))
    assert target.golden is None and target.golden_file is not None
    loaded = target.with_golden(npz)
    np.testing.assert_array_equal(loaded.golden.inputs[0], GOLDEN.inputs[0])
    assert loaded.golden.output_names == ("scores",)


def test_golden_bytes_that_are_not_the_signed_ones_are_refused() -> None:
    npz = GOLDEN.to_npz()
    target = model_targets.ModelTarget.from_target(
        _target(model_targets.model_custom("wide", "1", "float32", _details(npz)))
    )
    other = modelinfo.Golden(GOLDEN.inputs, (np.zeros((1, 3), np.float32),)).to_npz()
    with pytest.raises(HashMismatchError, match="not the signed golden data"):
        target.with_golden(other)
    with pytest.raises(HashMismatchError):
        target.with_golden(npz[:-1])


@pytest.mark.parametrize(
    "golden_file",
    [
        {"path": "wide/1/float32.tflite", "sha256": "a" * 64, "length": 10},  # not a golden path
        {"path": "wide/1/golden-aaaa.npz", "sha256": "a" * 10, "length": 10},  # not a sha256
        {"path": "wide/1/golden-aaaa.npz", "sha256": "a" * 64, "length": 0},
        {"path": "wide/1/golden-aaaa.npz", "sha256": "a" * 64, "length": modelinfo.MAX_GOLDEN_NPZ_BYTES + 1},
        {"path": "wide/1/golden-aaaa.npz"},
    ],
)
def test_malformed_golden_file_fields_are_refused(golden_file: dict[str, Any]) -> None:
    custom = model_targets.model_custom("wide", "1", "float32", _details(GOLDEN.to_npz()))
    custom["golden_file"] = golden_file
    with pytest.raises(SignatureError, match="malformed"):
        model_targets.ModelTarget.from_target(_target(custom))


def test_inline_golden_data_of_older_targets_still_reads() -> None:
    """Targets signed before golden files existed carry up to 256 KiB inline; devices keep reading them."""
    old = modelinfo.Golden((np.zeros((1, 20000), np.float32),), (np.ones((1, 3), np.float32),))
    assert not old.fits_inline
    details = {"signature": {"inputs": [], "outputs": []}, "golden": old.to_json(), "wire_bytes": 10}
    details["wire_sha256"] = "0" * 64
    target = model_targets.ModelTarget.from_target(
        _target(model_targets.model_custom("m", "1", "f", details))
    )
    assert target.golden_file is None and target.golden.inputs[0].shape == (1, 20000)


def test_a_golden_input_that_does_not_fit_the_model_is_refused() -> None:
    from edgefleet.devtools import modelgen
    from edgefleet.runtime import LITERT

    model = modelgen.build_large_mlp(50_000, in_features=64)
    with pytest.raises(ModelError, match="golden input 'features' is float32\\[1, 32\\]"):
        modelinfo.make_golden(model, LITERT, inputs=[np.zeros((1, 32), np.float32)])
    _, golden = modelinfo.make_golden(model, LITERT, inputs=[np.full((1, 64), 0.5, np.float32)])
    assert float(golden.inputs[0][0, 0]) == 0.5
