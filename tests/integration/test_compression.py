"""Server-side compression: real variants, measured per runtime, and the selection rule on top of them."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from typing import Any

import numpy as np
import pytest

from edgefleet import wire
from edgefleet.devtools import modelgen
from edgefleet.errors import InvalidRequestError, ModelError
from edgefleet.runtime import LITERT, TFLITE_RUNTIME, available_runtimes, make_interpreter
from edgefleet.server import compression
from edgefleet.server.compression import recipes
from edgefleet.server.storage.records import ModelRecord
from edgefleet.server.variants import choose_target

pytestmark = pytest.mark.skipif(
    available_runtimes() != [LITERT, TFLITE_RUNTIME], reason="compares ai-edge-litert with tflite-runtime"
)

DETAIL_KEYS = {
    "variant",
    "recipe",
    "size_bytes",
    "wire_bytes",
    "wire_encoding",
    "wire_sha256",
    "accuracy",
    "accuracy_delta_points",
    "max_abs_error",
    "mean_abs_error",
    "latency_ms",
    "peak_memory_bytes",
    "runtimes_ok",
    "runtimes_failed",
    "excluded",
}


@pytest.fixture(scope="module")
def digits(digits: tuple[bytes, bytes, modelgen.DigitsData]) -> tuple[bytes, modelgen.DigitsData]:
    """digits v1 (seed 0) and its data: the session's model (tests/conftest.py), not trained again here."""
    v1, _, data = digits
    return v1, data


@pytest.fixture(scope="module")
def variants(digits: tuple[bytes, modelgen.DigitsData]) -> dict[str, compression.Variant]:
    model, data = digits
    built = compression.build_variants(
        model, compression.EvalSet(data.x_test, data.y_test), calibration=data.x_train[:200]
    )
    return {v.name: v for v in built}


def _records(variants: list[compression.Variant]) -> list[ModelRecord]:
    return [
        ModelRecord(
            target_path=f"digits/1/{v.name}.tflite",
            name="digits",
            version="1",
            variant=v.name,
            sha256=hashlib.sha256(v.model).hexdigest(),
            length=len(v.model),
            signature={},
            created_ms=0,
            signed=True,
            details=v.details,
        )
        for v in variants
    ]


def _chosen(records: list[ModelRecord], capabilities: dict[str, Any], pinned: str = "") -> str:
    path = choose_target(records, capabilities, [], pinned)
    return next((r.variant for r in records if r.target_path == path), "")


def _accuracy(model: bytes, data: modelgen.DigitsData, runtime: str) -> float:
    return modelgen.accuracy(
        model, data.x_test, data.y_test, lambda content: make_interpreter(runtime, model_content=content)
    )


def test_expected_variants(variants: dict[str, compression.Variant], digits: tuple[bytes, Any]) -> None:
    assert set(variants) >= {
        "float32",
        "float16",
        "int8-dynamic-pc",
        "int8-dynamic-pt",
        "int8-weight-only",
        "int4-dynamic",
        "int8-static",
        "pruned25-int8-dynamic-pt",
        "pruned50-int4-dynamic",
    }
    assert variants["float32"].model == digits[0]
    assert len(variants["int8-dynamic-pt"].model) < len(digits[0]) / 3  # really quantized


def test_details_contract(variants: dict[str, compression.Variant]) -> None:
    for name, variant in variants.items():
        details = json.loads(json.dumps(variant.details))  # JSON-serialisable as it is signed
        assert DETAIL_KEYS <= set(details), name
        assert details["variant"] == name
        assert details["size_bytes"] == len(variant.model)
        assert details["wire_bytes"] == len(variant.wire)
        assert details["wire_encoding"] == variant.wire_encoding
        assert details["wire_sha256"] == hashlib.sha256(variant.wire).hexdigest()
        assert set(details["runtimes_ok"]).isdisjoint(details["runtimes_failed"])
        assert details["peak_memory_bytes"] > 0
        assert set(details["latency_ms"]) >= set(details["runtimes_ok"])


def test_wire_decodes_to_the_model(variants: dict[str, compression.Variant]) -> None:
    for variant in variants.values():
        decoder = wire.BoundedDecoder(variant.wire_encoding, len(variant.model))
        assert decoder.feed(variant.wire) + decoder.finish() == variant.model
        assert len(variant.wire) == min(len(wire.encode(variant.model, e)) for e in wire.ENCODINGS)


def test_accuracy_recomputed(
    variants: dict[str, compression.Variant], digits: tuple[bytes, modelgen.DigitsData]
) -> None:
    """Every variant is a real model: it runs, and its figures match a fresh run through the interpreter."""
    _, data = digits
    float_accuracy = _accuracy(variants["float32"].model, data, LITERT)
    assert float_accuracy > 0.97
    for name, variant in variants.items():
        details = variant.details
        accuracy = _accuracy(variant.model, data, LITERT)
        assert details["accuracy"] == pytest.approx(accuracy, abs=1e-9), name
        assert details["accuracy_delta_points"] == pytest.approx(100 * (float_accuracy - accuracy), abs=1e-6)
        for runtime in details["runtimes_ok"]:
            assert _accuracy(variant.model, data, runtime) >= float_accuracy - 0.01, (name, runtime)
        if details["accuracy_delta_points"] > 1.0:
            assert "over the 1.0 point tolerance" in details["excluded"], name
        else:
            assert details["excluded"] == "" and LITERT in details["runtimes_ok"], name


def test_per_channel_int8_is_silently_wrong_on_tflite_runtime(
    variants: dict[str, compression.Variant], digits: tuple[bytes, modelgen.DigitsData]
) -> None:
    _, data = digits
    details = variants["int8-dynamic-pc"].details
    assert details["runtimes_ok"] == [LITERT]
    assert details["runtimes_failed"][TFLITE_RUNTIME].startswith("wrong results")
    # It loads and runs there without any error: only measuring shows it is wrong.
    assert _accuracy(variants["int8-dynamic-pc"].model, data, TFLITE_RUNTIME) < 0.5
    for name in ("int8-dynamic-pt", "int8-weight-only", "int8-static"):
        assert variants[name].details["runtimes_ok"] == [LITERT, TFLITE_RUNTIME], name


def test_int4_weight_only_does_not_load_on_tflite_runtime(variants: dict[str, compression.Variant]) -> None:
    details = variants["int4-weight-only"].details
    assert details["runtimes_ok"] == [LITERT]
    assert details["runtimes_failed"][TFLITE_RUNTIME].startswith("does not load or run")


def test_tflite_runtime_device_never_gets_per_channel_int8(variants: dict[str, compression.Variant]) -> None:
    records = _records(list(variants.values()))
    assert _chosen(records, {"runtime": TFLITE_RUNTIME}) != "int8-dynamic-pc"
    assert _chosen(records, {"runtime": TFLITE_RUNTIME}, pinned="int8-dynamic-pc") == ""
    assert _chosen(records, {"runtime": LITERT}, pinned="int8-dynamic-pc") == "int8-dynamic-pc"
    # Even when it is the only quantized variant offered, that device falls back to float32.
    only = _records([variants["float32"], variants["int8-dynamic-pc"]])
    assert _chosen(only, {"runtime": TFLITE_RUNTIME}) == "float32"
    assert _chosen(only, {"runtime": LITERT}) == "int8-dynamic-pc"


def test_smallest_wire_among_equally_accurate(variants: dict[str, compression.Variant]) -> None:
    records = _records(list(variants.values()))
    for runtime in (LITERT, TFLITE_RUNTIME):
        usable = [r for r in records if not r.details["excluded"] and runtime in r.details["runtimes_ok"]]
        best = max(r.details["accuracy"] for r in usable)
        tied = [r for r in usable if best - r.details["accuracy"] <= 0.001]
        assert len({r.details["wire_bytes"] for r in tied}) > 1  # the case is real: ties of different sizes
        smallest = min(tied, key=lambda r: r.details["wire_bytes"])
        assert _chosen(records, {"runtime": runtime}) == smallest.variant


def test_tiny_tolerance_never_assigns_a_variant_over_it(digits: tuple[bytes, modelgen.DigitsData]) -> None:
    model, data = digits
    tolerance = 0.01
    built = compression.build_variants(
        model, compression.EvalSet(data.x_test, data.y_test), tolerance_points=tolerance, sparsity=(0.25,)
    )
    over = [v for v in built if v.details["accuracy_delta_points"] > tolerance]
    assert {"int4-dynamic", "pruned25-int4-dynamic"} <= {v.name for v in over}
    assert all(v.details["excluded"] for v in over)
    records = _records(built)
    for runtime in (LITERT, TFLITE_RUNTIME):
        chosen = _chosen(records, {"runtime": runtime})
        assert (
            chosen
            and next(v for v in built if v.name == chosen).details["accuracy_delta_points"] <= tolerance
        )
        for variant in over:
            assert _chosen(records, {"runtime": runtime}, pinned=variant.name) == ""


def test_memory_poor_device_gets_a_smaller_variant() -> None:
    """A 4 MiB model, where weights dominate the interpreter's memory (digits is too small to tell)."""
    model = modelgen.build_large_mlp(4 * 2**20)
    x = np.random.default_rng(1).standard_normal((100, 64)).astype(np.float32)
    interpreter = make_interpreter(LITERT, model_content=model)
    labels = []
    for row in x:  # labels from float32 itself, and a loose tolerance: an untrained net keeps few otherwise
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], row[None])
        interpreter.invoke()
        labels.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).argmax())
    eval_set = compression.EvalSet(x, np.array(labels))
    built = compression.build_variants(model, eval_set, tolerance_points=50, sparsity=())
    by_name = {v.name: v.details for v in built}
    # What the rule compares: memory beyond the runtime's own fixed cost.
    assert by_name["float32"]["model_memory_bytes"] > 1.5 * len(model)  # the file and XNNPACK's packed copy
    assert by_name["int8-dynamic-pt"]["model_memory_bytes"] < by_name["float32"]["model_memory_bytes"] - len(
        model
    )
    assert by_name["float32"]["peak_memory_bytes"] > by_name["float32"]["model_memory_bytes"]

    records = _records(built)
    rich = _chosen(records, {"runtime": LITERT})
    # Less than any variant with float weights in memory needs (float16 and weight-only dequantize to float).
    budget = by_name["float32"]["model_memory_bytes"] - len(model)
    poor = _chosen(records, {"runtime": LITERT, "memory_available_bytes": 2 * budget})  # the rule grants half
    assert by_name[poor]["model_memory_bytes"] <= budget < by_name[rich]["model_memory_bytes"]
    assert by_name[poor]["size_bytes"] < by_name[rich]["size_bytes"] / 1.9
    assert _chosen(records, {"runtime": LITERT, "memory_available_bytes": 1 << 16}) == ""


def test_without_eval_set_judged_by_error_against_float(digits: tuple[bytes, Any]) -> None:
    built = {v.name: v.details for v in compression.build_variants(digits[0], None, sparsity=())}
    assert built["float32"]["accuracy"] is None
    assert built["float32"]["accuracy_delta_points"] == 0
    assert not built["float16"]["excluded"]  # float16 stays well within 1 % of float32's outputs
    assert built["int8-dynamic-pc"]["max_abs_error"] > built["float16"]["max_abs_error"]
    assert TFLITE_RUNTIME in built["int8-dynamic-pc"]["runtimes_failed"]
    assert "int8-static" not in built  # no calibration data


def test_prune_zeroes_the_smallest_weights(digits: tuple[bytes, Any]) -> None:
    model = digits[0]
    pruned = compression.prune(model, 0.5)
    assert len(pruned) == len(model)
    weights = np.frombuffer(model, np.uint8)
    changed = np.flatnonzero(weights != np.frombuffer(pruned, np.uint8))
    assert len(changed) > 0.45 * 4 * (64 * 64 + 64 * 128 + 128 * 64 + 64 * 10)  # bytes of zeroed float32s
    make_interpreter(LITERT, model_content=pruned).invoke()


# ---- eval sets ---------------------------------------------------------------------------------------


def _npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_load_eval_npz(digits: tuple[bytes, modelgen.DigitsData]) -> None:
    _, data = digits
    loaded = compression.load_eval_npz(_npz(x=data.x_test, y=data.y_test))
    np.testing.assert_array_equal(loaded.x, data.x_test)
    np.testing.assert_array_equal(loaded.y, data.y_test)
    assert loaded.reference is None
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=data.x_test, reference=np.zeros((len(data.x_test), 10), np.float32))
    assert compression.load_eval_npz(buffer.getvalue()).reference.shape == (len(data.x_test), 10)


def _lying_header_npz() -> bytes:
    """An x whose .npy header claims ten million rows while the data holds four."""
    member = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (10_000_000, 64)}
    np.lib.format.write_array_header_1_0(member, header)
    member.write(np.zeros((4, 64), np.float32).tobytes())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("x.npy", member.getvalue())
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not a zip at all", "not a readable .npz"),
        (_npz(y=np.zeros(3, np.int64)), "expected x plus y"),
        (_npz(x=np.zeros((3, 64)), z=np.zeros(3)), "expected x plus y"),
        (_npz(x=np.array([{"a": 1}, None], dtype=object)), "dtype object"),
        (_npz(x=np.zeros(64, np.float32)), "expected rows of model input"),
        (_npz(x=np.full((3, 64), np.nan, np.float32)), "NaN"),
        (_npz(x=np.zeros((3, 64)), y=np.zeros(2, np.int64)), "expected 3 integer labels"),
        (_npz(x=np.zeros((3, 64)), y=np.zeros(3, np.float32)), "expected 3 integer labels"),
        (_npz(x=np.zeros((3, 64)), y=-np.ones(3, np.int64)), "negative labels"),
        (_npz(x=np.zeros((3, 64)), reference=np.full((3, 10), np.inf)), "NaN or infinity"),
        (_npz(x=np.zeros((3, 64)), reference=np.zeros((2, 10))), "expected 3 rows of model output"),
        (_npz(x=np.array(["a", "b"])), "use numeric arrays"),
        (_lying_header_npz(), "claims more data than it holds"),
    ],
)
def test_bad_eval_npz_refused(data: bytes, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        compression.load_eval_npz(data)


def test_eval_npz_size_limits() -> None:
    data = _npz(x=np.zeros((1000, 64), np.float32))
    with pytest.raises(InvalidRequestError, match="over the 1000 limit"):
        compression.load_eval_npz(data, max_bytes=1000)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros((1000, 64), np.float32))  # 256 KB of zeros, packed small
    with pytest.raises(InvalidRequestError, match="unpacks to"):
        compression.load_eval_npz(buffer.getvalue(), max_bytes=100_000)


def test_eval_set_that_does_not_fit_the_model_refused(digits: tuple[bytes, modelgen.DigitsData]) -> None:
    model, data = digits
    with pytest.raises(InvalidRequestError, match=r"rows of shape \(63,\)"):
        compression.build_variants(model, compression.EvalSet(data.x_test[:, :63], data.y_test))
    with pytest.raises(InvalidRequestError, match="label 10"):
        compression.build_variants(model, compression.EvalSet(data.x_test, data.y_test + 1))
    with pytest.raises(ModelError, match="reference outputs"):
        compression.build_variants(
            model, compression.EvalSet(data.x_test, reference=np.full((len(data.x_test), 10), 0.1))
        )


def test_blockwise_int4_is_measured_not_trusted(
    digits: tuple[bytes, modelgen.DigitsData], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blockwise int4 gives garbage on tflite-runtime 2.14, or segfaults it (it did once in-process, which is
    why variants only ever run in child processes)."""
    model, data = digits
    blockwise = (
        "int4 weights in blocks of 32",
        lambda qt: qt.add_dynamic_config(
            ".*", recipes.ALL_OPS, 4, granularity=recipes.qtyping.QuantGranularity.BLOCKWISE_32
        ),
    )
    monkeypatch.setattr(recipes, "RECIPES", {"int4-dynamic-b32": blockwise})
    built = compression.build_variants(model, compression.EvalSet(data.x_test, data.y_test), sparsity=())
    details = {v.name: v.details for v in built}["int4-dynamic-b32"]
    assert details["runtimes_ok"] == [LITERT]
    reason = details["runtimes_failed"][TFLITE_RUNTIME]
    assert reason.startswith(("wrong results", "crashes the runtime")), reason
