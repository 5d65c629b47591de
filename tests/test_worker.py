"""The model worker's load path: the candidate loads at a lower CPU priority and serves at normal priority,
its warm-up inputs run in the load, and retiring a worker sends waiting callers to the new one."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.serving import ModelWorker, Serving
from device_agent.worker import LOAD_NICENESS
from edgefleet.modelgen import DigitsData
from edgefleet.runtime import RUNTIMES, available_runtimes, make_interpreter


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    if request.param not in available_runtimes():
        pytest.skip(f"{request.param} is not installed")
    return str(request.param)


def _niceness_by_thread(pid: int) -> dict[int, int]:
    """Linux keeps a nice value per thread: /proc/PID/task/TID/stat, field 19."""
    values = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        values[int(task.name)] = int(fields[16])  # fields after the command name start at field 3
    return values


def _bare_outputs(runtime: str, path: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    interpreter = make_interpreter(runtime, model_path=str(path))
    for detail, array in zip(interpreter.get_input_details(), inputs, strict=True):
        interpreter.set_tensor(detail["index"], array)
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]


def test_candidate_loads_at_low_priority_and_serves_at_normal_priority(
    runtime: str, digits_files: dict[str, Path], digits: tuple[bytes, bytes, DigitsData]
) -> None:
    worker = ModelWorker(None, runtime).spawn()
    try:
        pid = worker.pid
        assert pid is not None
        deadline = time.monotonic() + 30
        # The loader thread lowers its own priority first thing, then waits for the model's path.
        while sorted(_niceness_by_thread(pid).values()) != [0, LOAD_NICENESS]:
            assert time.monotonic() < deadline, _niceness_by_thread(pid)
            time.sleep(0.01)
        assert _niceness_by_thread(pid)[pid] == 0, "the main thread, which serves, must keep normal priority"

        x = digits[2].x_test[:1].astype(np.float32)
        worker.load(digits_files["v1"], warm_inputs=[x])
        assert worker.warm_error is None
        expected = _bare_outputs(runtime, digits_files["v1"], [x])
        assert worker.warm_outputs is not None
        np.testing.assert_array_equal(worker.warm_outputs[0], expected[0])
        # The loader is gone; what serves runs at normal priority.
        deadline = time.monotonic() + 10
        while LOAD_NICENESS in _niceness_by_thread(pid).values():
            assert time.monotonic() < deadline, _niceness_by_thread(pid)
            time.sleep(0.01)
        assert _niceness_by_thread(pid)[pid] == 0
        np.testing.assert_array_equal(worker.call([x], timeout=10)[0], expected[0])
    finally:
        worker.kill()


def test_warm_inputs_that_do_not_fit_are_reported_and_the_worker_still_serves(
    runtime: str, digits_files: dict[str, Path]
) -> None:
    worker = ModelWorker(digits_files["v1"], runtime)
    try:
        signature = worker.load(digits_files["v1"], warm_inputs=[np.zeros((1, 3), np.float32)])
        assert [t.shape for t in signature.inputs] == [(1, 64)]
        assert worker.warm_outputs is None
        assert worker.warm_error and "ValueError" in worker.warm_error, worker.warm_error
        (probabilities,) = worker.call([np.zeros((1, 64), np.float32)], timeout=10)
        assert probabilities.shape == (1, 10)
    finally:
        worker.kill()


def test_retiring_during_calls_moves_every_caller_to_the_new_worker_without_a_failure(
    runtime: str, digits_files: dict[str, Path]
) -> None:
    x = np.zeros((1, 64), np.float32)
    serving = Serving()
    workers = []
    for name in ("v1", "v2"):
        worker = ModelWorker(digits_files[name], runtime)
        worker.load(digits_files[name], warm_inputs=[x])
        workers.append(worker)
    serving.swap(workers[0], {"target_path": "v1"})
    stop = threading.Event()
    seen: list[str] = []
    failures: list[BaseException] = []

    def caller() -> None:
        while not stop.is_set():
            try:
                seen.append(serving.infer([x]).target_path)
            except BaseException as e:  # noqa: BLE001 - any failure is what this test looks for
                failures.append(e)

    threads = [threading.Thread(target=caller) for _ in range(3)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.2)
        old = serving.swap(workers[1], {"target_path": "v2"})
        assert old is workers[0]
        old.retire()
        calls_at_retire = len(seen)
        time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        serving.stop()
        for worker in workers:
            worker.kill()
    assert not failures, failures
    assert not workers[0].alive()
    assert seen[calls_at_retire:] and set(seen[calls_at_retire + 3 :]) == {"v2"}
