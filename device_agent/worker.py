"""The child process that runs one model:
`python -m edgefleet.agent.worker FD RUNTIME THREADS MEMORY_LIMIT LOW_PRIORITY`.

It imports the runtime, waits for the optional warm-up inputs and then the descriptor of the model's sealed
bytes (SCM_RIGHTS) on the socket, loads the model from that descriptor, runs the warm-up inputs once, sends
its tensor signature and those outputs, then answers inference requests until it receives None or the
socket closes. Errors are sent back, never raised: the parent decides
what they mean.

Loading happens on a thread of its own. With LOW_PRIORITY (a candidate loading beside the active model on
the same cores) that thread runs 10 nice levels below the process (Linux; with one interpreter thread), so
the load yields to the callers instead of taking an equal share. Not 19 levels: with both cores busy at
normal priority, import + load + warm-up of a 30 MiB model took 1.1 s at +10 but 7.2 s at +19 (0.3 s at
+0), and an update must not starve on a busy device. Serving then happens on the main thread, at the
process's own priority (Linux keeps a nice value per thread, and a process may not raise its priority back).
"""

from __future__ import annotations

import multiprocessing.connection
import os
import sys
import threading
from multiprocessing.reduction import recv_handle
from typing import Any

LOAD_NICENESS = 10  # added to the process's own


def main(argv: list[str]) -> None:
    fd, runtime, num_threads, memory_limit, low_priority = argv
    conn = multiprocessing.connection.Connection(int(fd))
    if int(memory_limit):
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (int(memory_limit), int(memory_limit)))
    loaded: list[Any] = []
    loader = threading.Thread(
        target=_load, args=(conn, runtime, int(num_threads), low_priority == "1", loaded), name="loader"
    )
    try:
        loader.start()
    except RuntimeError as e:  # no memory left for a thread under the limit
        _reply(conn, ("error", f"cannot start the loader: {e}"))
        return
    loader.join()
    if not loaded:
        return
    interpreter, inputs, outputs = loaded
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        try:
            reply: tuple[Any, ...] = ("ok", _run(interpreter, inputs, outputs, request))
        except Exception as e:
            reply = ("error", f"{type(e).__name__}: {e}")
        if not _reply(conn, reply):
            return


def _load(
    conn: multiprocessing.connection.Connection,
    runtime: str,
    num_threads: int,
    low_priority: bool,
    loaded: list[Any],
) -> None:
    # With more than one interpreter thread the runtime starts its pool from this thread, and the pool would
    # keep the lower priority for good: then load at the process's own priority.
    if low_priority and num_threads == 1:
        _lower_priority_of_this_thread()
    try:
        from edgefleet.modelinfo import quantization_of, signature_of
        from edgefleet.runtime import make_interpreter

        import_runtime(runtime)
        warm_inputs = conn.recv()
        # The sealed memfd the agent checked (edgefleet.agent.sealed_model): nobody can change these bytes.
        model_fd = recv_handle(conn)
        interpreter = make_interpreter(
            runtime, model_path=f"/proc/self/fd/{model_fd}", num_threads=num_threads
        )
        signature = signature_of(interpreter).to_json()
        inputs = [d["index"] for d in interpreter.get_input_details()]
        output_details = interpreter.get_output_details()
        outputs = [d["index"] for d in output_details]
        # The first output's (scale, zero point), for the agent's output summaries of int8/uint8 models.
        quantization = quantization_of(output_details[:1])[0] if output_details else (0.0, 0)
    except BaseException as e:  # anything: a bad model, no memory, a missing runtime, the parent gone
        _reply(conn, ("error", f"{type(e).__name__}: {e}"))
        return
    warm_outputs, warm_error = None, None
    if warm_inputs is not None:
        try:
            warm_outputs = _run(interpreter, inputs, outputs, warm_inputs)
        except Exception as e:
            warm_error = f"{type(e).__name__}: {e}"
    if _reply(conn, ("ready", signature, warm_outputs, warm_error, quantization)):
        loaded.extend((interpreter, inputs, outputs))


def _reply(conn: multiprocessing.connection.Connection, message: tuple[Any, ...]) -> bool:
    """False when the parent has gone (it stopped waiting, or died): then there is nothing left to do."""
    try:
        conn.send(message)
    except OSError:
        return False
    return True


def _run(interpreter: Any, inputs: list[int], outputs: list[int], arrays: list[Any]) -> list[Any]:
    for index, array in zip(inputs, arrays, strict=True):
        interpreter.set_tensor(index, array)
    interpreter.invoke()
    return [interpreter.get_tensor(i) for i in outputs]


def _lower_priority_of_this_thread() -> None:
    if not sys.platform.startswith("linux"):  # elsewhere the nice value is per process, serving included
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(
            os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + LOAD_NICENESS)
        )
    except OSError:  # not allowed: load at the process's priority
        pass


def import_runtime(runtime: str) -> None:
    """Import before the model arrives, so loading it later costs only the load."""
    from edgefleet.runtime import _module

    _module(runtime)


if __name__ == "__main__":
    main(sys.argv[1:])
