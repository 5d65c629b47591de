"""A shadow candidate beside a serving model, with real worker processes and real models: the rate limit
bounds what runs on the candidate, every answer is the serving model's, and a candidate that hangs never
holds up a served call."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.serving import ModelWorker, Serving
from edgefleet.agent.shadow import Shadow, ShadowLimits
from edgefleet.devtools.hostile import build_hanging_model
from edgefleet.devtools.modelgen import DigitsData, build_large_mlp
from edgefleet.modelinfo import run
from edgefleet.runtime import default_runtime, make_interpreter
from edgefleet.values import ModelRef

SERVING = ModelRef("m/1/float32.tflite", "m", "1", "float32")
CANDIDATE = ModelRef("m/2/float32.tflite", "m", "2", "float32")


@pytest.fixture
def serving() -> Iterator[Serving]:
    s = Serving(call_timeout=10)
    yield s
    s.stop()


def _worker(path: Path) -> ModelWorker:
    worker = ModelWorker(path, default_runtime())
    worker.start()
    return worker


def test_the_rate_limit_bounds_the_candidate_and_every_answer_is_the_serving_models(
    serving: Serving, digits_files: dict[str, Path], digits: tuple[bytes, bytes, DigitsData]
) -> None:
    v1, _, data = digits
    serving.swap(_worker(digits_files["v1"]), SERVING)
    serving.shadow = Shadow(_worker(digits_files["v2"]), CANDIDATE, ShadowLimits(max_per_s=5, cpu_budget=1.0))
    inputs = [data.x_test[i : i + 1].astype(np.float32) for i in range(20)]
    interpreter = make_interpreter(default_runtime(), model_content=v1)
    want = [run(interpreter, [x])[0] for x in inputs]
    started, calls = time.monotonic(), 0
    while time.monotonic() - started < 2.0:
        result = serving.infer([inputs[calls % 20]])
        assert result.target_path == SERVING.target_path
        np.testing.assert_allclose(result.outputs[0], want[calls % 20], rtol=1e-5, atol=1e-6)
        calls += 1
    time.sleep(0.3)  # the last sample finishes
    stats = serving.shadow.take_stats()
    elapsed = time.monotonic() - started
    assert 1 <= stats.compared_calls + stats.candidate_errors <= 5 * elapsed + 1
    assert stats.candidate_errors == 0 and stats.skipped_calls >= calls - 5 * elapsed - 1
    assert 0 <= stats.top1_agreed <= stats.compared_calls and stats.abs_diff_sum > 0
    assert sum(stats.candidate_latency_counts) == stats.compared_calls
    served = serving.take_stats()[SERVING.target_path]
    assert served.count == calls and sum(served.outputs.classes) == calls


def test_a_hanging_candidate_never_holds_up_a_served_call(serving: Serving, tmp_path: Path) -> None:
    (tmp_path / "mlp.tflite").write_bytes(build_large_mlp(64 * 1024, in_features=4, n_classes=4))
    (tmp_path / "hang.tflite").write_bytes(build_hanging_model())
    serving.swap(_worker(tmp_path / "mlp.tflite"), SERVING)
    shadow = Shadow(_worker(tmp_path / "hang.tflite"), CANDIDATE, ShadowLimits(call_timeout_s=1.0))
    serving.shadow = shadow
    x = np.ones((1, 4), np.float32)
    slowest, started = 0.0, time.monotonic()
    while time.monotonic() - started < 2.0:
        call = time.perf_counter()
        serving.infer([x])
        slowest = max(slowest, time.perf_counter() - call)
    assert slowest < 0.5  # a served call never waits for the candidate, which hangs for 1 s per sample
    stopping = time.monotonic()
    shadow.stop()
    assert time.monotonic() - stopping < 1.0  # killed, not waited for
    stats = shadow.take_stats()
    assert stats.compared_calls == 0 and stats.candidate_errors >= 1 and stats.skipped_calls > 0


def _uint8_output_model() -> bytes:
    """float32 [1, 4] in -> QUANTIZE -> uint8 [1, 4] out, scale 1/255, zero point 0."""
    from ai_edge_litert import schema_py_generated as schema

    from edgefleet.devtools.hostile import _Model

    model = _Model("edgefleet test: a uint8 output")
    main = model.subgraph("main")
    x = main.tensor("x", (1, 4))
    y = main.tensor("y", (1, 4), dtype=schema.TensorType.UINT8)
    params = schema.QuantizationParametersT()
    params.scale, params.zeroPoint = [1 / 255], [0]
    main.t.tensors[y].quantization = params
    main.op(schema.BuiltinOperator.QUANTIZE, [x], [y])
    main.io([x], [y])
    return model.finish()


def test_a_uint8_output_is_summarised_after_dequantizing_with_its_scale_and_zero_point(
    serving: Serving, tmp_path: Path
) -> None:
    (tmp_path / "u8.tflite").write_bytes(_uint8_output_model())
    worker = _worker(tmp_path / "u8.tflite")
    assert worker.quantization.scale == pytest.approx(1 / 255) and worker.quantization.zero_point == 0
    serving.swap(worker, SERVING)
    result = serving.infer([np.array([[0.1, 0.55, 0.3, 0.2]], np.float32)])
    assert result.outputs[0].dtype == np.uint8 and int(result.outputs[0][0, 1]) == 140
    summary = serving.take_stats()[SERVING.target_path].outputs.summary()
    assert summary is not None
    # 140 * (1/255) = 0.55: bin 5 (read raw, 140 would be clipped to 1.0, bin 9).
    assert summary.top_class_counts == (0, 1) and summary.top_score_counts[5] == 1
