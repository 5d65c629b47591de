"""The child process that runs one model: `python -m device_agent.worker FD RUNTIME THREADS MEMORY_LIMIT`.

It imports the runtime, waits for the model's path on the socket, loads it, sends its tensor signature, then
answers inference requests until it receives None or the socket closes. Errors are sent back, never raised:
the parent decides what they mean.
"""

from __future__ import annotations

import multiprocessing.connection
import sys


def main(argv: list[str]) -> None:
    fd, runtime, num_threads, memory_limit = argv
    conn = multiprocessing.connection.Connection(int(fd))
    if int(memory_limit):
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (int(memory_limit), int(memory_limit)))
    try:
        from edgefleet.modelinfo import signature_of
        from edgefleet.runtime import make_interpreter

        import_runtime(runtime)
        model_path = conn.recv()
        interpreter = make_interpreter(runtime, model_path=model_path, num_threads=int(num_threads))
        conn.send(("ready", signature_of(interpreter).to_json()))
    except BaseException as e:  # anything: a bad model, no memory, a missing runtime
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    inputs = [d["index"] for d in interpreter.get_input_details()]
    outputs = [d["index"] for d in interpreter.get_output_details()]
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        try:
            for index, array in zip(inputs, request, strict=True):
                interpreter.set_tensor(index, array)
            interpreter.invoke()
            conn.send(("ok", [interpreter.get_tensor(i) for i in outputs]))
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))


def import_runtime(runtime: str) -> None:
    """Import before the model arrives, so loading it later costs only the load."""
    from edgefleet.runtime import _module

    _module(runtime)


if __name__ == "__main__":
    main(sys.argv[1:])
