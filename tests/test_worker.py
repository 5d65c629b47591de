"""The model worker's load path and hot swaps: the candidate loads at a lower CPU priority and serves at
normal priority, its warm-up inputs run in the load, retiring a worker sends waiting callers to the new one,
and callers on several threads see no failed or torn call through 100 swaps."""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.serving import ModelWorker, Serving
from device_agent.worker import LOAD_NICENESS
from edgefleet.modelgen import DigitsData
from edgefleet.runtime import RUNTIMES, available_runtimes, default_runtime, make_interpreter


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


def test_inference_on_several_threads_during_100_swaps_never_fails_or_tears(
    digits_files: dict[str, Path], digits: tuple[bytes, bytes, DigitsData]
) -> None:
    """RELIABILITY.md: inference in a tight loop on several threads during 100 swaps: no crash, no torn
    output, no failed call. Every result must carry the output of the model it names."""
    runtime = default_runtime()
    x = digits[2].x_test[:1].astype(np.float32)
    paths = [digits_files["v1"], digits_files["v2"]]
    expected = {str(p): _bare_outputs(runtime, p, [x])[0] for p in paths}
    assert not np.allclose(*expected.values()), "the two versions must give different outputs"

    def ready_worker(path: Path) -> ModelWorker:  # as the agent does: spawn, load with the golden input
        worker = ModelWorker(path, runtime).spawn()
        worker.load(path, warm_inputs=[x])
        assert worker.warm_outputs is not None
        np.testing.assert_allclose(worker.warm_outputs[0], expected[str(path)], rtol=1e-6)
        return worker

    serving = Serving()
    serving.swap(ready_worker(paths[0]), {"target_path": str(paths[0])})
    stop = threading.Event()
    calls = collections.Counter[str]()
    problems: list[str] = []

    def caller() -> None:
        while not stop.is_set():
            try:
                result = serving.infer([x])
            except BaseException as e:  # noqa: BLE001 - any failure is what this test looks for
                problems.append(f"failed: {type(e).__name__}: {e}")
                continue
            calls[result.target_path] += 1
            if not np.allclose(result.outputs[0], expected[result.target_path], rtol=1e-6):
                problems.append(f"torn: output does not belong to {result.target_path}")

    threads = [threading.Thread(target=caller) for _ in range(4)]
    swaps = 100
    # Candidates are made two at a time ahead of their swap, as the agent starts one during the download.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            for thread in threads:
                thread.start()
            upcoming = [pool.submit(ready_worker, paths[(i + 1) % 2]) for i in range(2)]
            for i in range(swaps):
                new = upcoming.pop(0).result(timeout=60)
                if i + 2 < swaps:
                    upcoming.append(pool.submit(ready_worker, paths[(i + 3) % 2]))
                before = sum(calls.values())
                old = serving.swap(new, {"target_path": str(paths[(i + 1) % 2])})
                assert old is not None
                old.retire()
                while sum(calls.values()) < before + 8:  # each model serves some calls before the next swap
                    assert not problems, problems[:5]
                    time.sleep(0.001)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=10)
            for future in upcoming:
                future.result(timeout=60).kill()
            serving.stop()
    assert not problems, problems[:5]
    assert min(calls.values()) > swaps, calls  # both versions served, many calls each
