"""Run a function on untrusted model bytes in a fresh Python process, with a time and memory limit.

A signed model is still untrusted input for the TFLite interpreter: a crafted file can overflow its stack
(SIGSEGV), loop forever in invoke(), or ask for gigabytes. The server inspects and compresses uploads this
way; the agent runs every model in its own worker process (edgefleet.agent.serving) for the same reason.

    result = sandbox.run("edgefleet.server.fleet:describe_upload", arg1, arg2, timeout=120, memory_limit=2 * 2**30)

The child gets the arguments pickled on stdin and writes its pickled result to a private temp file (stdout
stays free for whatever the libraries print; a file, unlike a pipe, cannot fill up while we wait). A crash, a timeout or a memory limit becomes ModelError; an
EdgefleetError raised in the child is raised again here.
"""

from __future__ import annotations

import importlib
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgefleet.errors import EdgefleetError, ModelError


def run(target: str, *args: Any, timeout: float, memory_limit: int = 0) -> Any:
    with tempfile.TemporaryDirectory(prefix="edgefleet-sandbox-") as folder:
        result_path = Path(folder) / "result.pickle"
        process = subprocess.Popen(
            [sys.executable, "-m", "edgefleet.sandbox", str(result_path), str(memory_limit)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _, stderr = process.communicate(pickle.dumps((target, args)), timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise ModelError(f"{target} did not finish within {timeout:.0f} s; stopped") from None
        if process.returncode != 0 or not result_path.exists():
            tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise ModelError(f"{target} crashed (exit {process.returncode}): {tail[0][:300]}")
        status, value = pickle.loads(result_path.read_bytes())
    if status == "ok":
        return value
    if isinstance(value, EdgefleetError):
        raise value
    raise ModelError(f"{target} failed: {value}")


def _main(argv: list[str]) -> None:
    result_path, memory_limit = Path(argv[0]), int(argv[1])
    if memory_limit:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    target, args = pickle.loads(sys.stdin.buffer.read())
    module, _, name = target.partition(":")
    try:
        result: tuple[str, Any] = ("ok", getattr(importlib.import_module(module), name)(*args))
    except EdgefleetError as e:
        result = ("error", e)
    except Exception as e:  # anything else is reported as text: its class may not unpickle in the parent
        result = ("error", f"{type(e).__name__}: {e}")
    result_path.write_bytes(pickle.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1:])
