"""The generated .tflite models must load and run identically on both runtimes the fleet supports."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from edgefleet.devtools import modelgen
from edgefleet.server import tflite_writer

RUNTIMES = ["tflite_runtime.interpreter", "ai_edge_litert.interpreter"]
Factory = Callable[[bytes], Any]


def _factory(module_name: str) -> Factory:
    module = pytest.importorskip(module_name)
    return lambda content: module.Interpreter(model_content=content)


@pytest.fixture(params=RUNTIMES)
def make_interpreter(request: pytest.FixtureRequest) -> Factory:
    return _factory(request.param)


@pytest.fixture(scope="module")
def digits() -> tuple[bytes, modelgen.DigitsData]:
    return modelgen.build_digits_model(seed=0)


def _run(interpreter: Any, x: np.ndarray) -> np.ndarray:
    """Outputs for each row of ``x``, one invoke per batch of the model's (static) batch size."""
    (input_detail,) = interpreter.get_input_details()
    (output_detail,) = interpreter.get_output_details()
    batch = input_detail["shape"][0]
    outputs = []
    for start in range(0, len(x), batch):
        interpreter.set_tensor(input_detail["index"], x[start : start + batch])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(output_detail["index"]))
    return np.concatenate(outputs)


def test_digits_model_interface(make_interpreter: Factory, digits: tuple[bytes, modelgen.DigitsData]) -> None:
    model, _ = digits
    assert model[4:8] == b"TFL3"
    interpreter = make_interpreter(model)
    interpreter.allocate_tensors()
    (input_detail,) = interpreter.get_input_details()
    (output_detail,) = interpreter.get_output_details()
    assert input_detail["name"] == "pixels"
    assert input_detail["shape"].tolist() == [1, 64]
    assert input_detail["dtype"] == np.float32
    assert output_detail["name"] == "probabilities"
    assert output_detail["shape"].tolist() == [1, 10]
    assert output_detail["dtype"] == np.float32
    assert interpreter.get_signature_list() == {
        "serving_default": {"inputs": ["pixels"], "outputs": ["probabilities"]}
    }


def test_digits_model_accuracy(make_interpreter: Factory, digits: tuple[bytes, modelgen.DigitsData]) -> None:
    model, data = digits
    assert modelgen.accuracy(model, data.x_test, data.y_test, make_interpreter) >= 0.97


def test_runtimes_agree(digits: tuple[bytes, modelgen.DigitsData]) -> None:
    model, data = digits
    outputs = []
    for runtime in RUNTIMES:
        interpreter = _factory(runtime)(model)
        interpreter.allocate_tensors()
        outputs.append(_run(interpreter, data.x_test))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(outputs[0].sum(axis=1), 1.0, atol=1e-5)


def test_seeds_give_different_models(digits: tuple[bytes, modelgen.DigitsData]) -> None:
    v1, _ = digits
    v2, _ = modelgen.build_digits_model(seed=1)
    assert len(v1) == len(v2)
    assert v1 != v2


def test_batched_model_matches_numpy(make_interpreter: Factory) -> None:
    rng = np.random.default_rng(0)
    sizes = [6, 5, 4, 3]
    layers = [
        (rng.standard_normal((n_in, n_out)).astype(np.float32), rng.standard_normal(n_out).astype(np.float32))
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
    ]
    model = tflite_writer.mlp_to_tflite(layers, input_name="x", output_name="y", batch=4)
    for w, b in layers:  # constant data honours the schema's 16-byte alignment
        assert model.find(w.T.astype("<f4").tobytes()) % 16 == 0
        assert model.find(b.astype("<f4").tobytes()) % 16 == 0

    x = rng.random((8, 6), dtype=np.float32)
    expected = x
    for w, b in layers[:-1]:
        expected = np.maximum(expected @ w + b, 0)
    logits = expected @ layers[-1][0] + layers[-1][1]
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    interpreter = make_interpreter(model)
    interpreter.allocate_tensors()
    np.testing.assert_allclose(_run(interpreter, x), expected, rtol=1e-5, atol=1e-6)
    # 7 rows exercise accuracy()'s zero-padding of the last, partial batch.
    labels = expected.argmax(axis=1)
    assert modelgen.accuracy(model, x[:7], labels[:7], make_interpreter) == 1.0


def test_large_model(make_interpreter: Factory) -> None:
    target = 4 * 2**20
    model = modelgen.build_large_mlp(target, seed=3)
    assert abs(len(model) - target) <= 0.05 * target
    assert modelgen.build_large_mlp(target, seed=3) == model

    interpreter = make_interpreter(model)
    interpreter.allocate_tensors()
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    outputs = _run(interpreter, x)
    assert outputs.shape == (5, 10)
    assert np.isfinite(outputs).all()


def test_large_model_rejects_tiny_target() -> None:
    with pytest.raises(ValueError, match="too small"):
        modelgen.build_large_mlp(1000)
