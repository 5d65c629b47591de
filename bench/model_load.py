"""What does loading from checked, sealed bytes cost against loading the file by its path?

The agent used to hash the file, then let the worker open it by path (a window in which anyone who can write
the models folder could swap the bytes). It now reads the file once into a sealed memfd while hashing, and
the worker loads exactly those bytes (`edgefleet.agent.sealed_model`). For each model size this times, in
the same run, interleaved, `--reps` times each:

    path    hash the file (as `verify_file` did), then an interpreter loads it by its path
    sealed  read it into a sealed memfd while hashing (`SealedModel.verified`), an interpreter loads
            /proc/self/fd/N (what the worker does with the descriptor it is sent)

and prints the median and max of the check, of the load (interpreter + allocate_tensors) and of both. Both
run in this process, so only the difference between the two paths is measured (the worker process, its
start and its socket are the same for both). The page cache is warm in both (the file was just written), as
it is on a device right after a download.

Run: .venv/bin/python bench/model_load.py [--sizes 1,30] [--runtime ai-edge-litert] [--reps 7]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

from edgefleet.agent.sealed_model import SealedModel
from edgefleet.devtools.modelgen import build_large_mlp
from edgefleet.runtime import default_runtime, make_interpreter


def _hash_file(path: Path) -> tuple[int, str]:
    digest, length = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            length += len(chunk)
    return length, digest.hexdigest()


def _once(mode: str, path: Path, length: int, sha: str, runtime: str) -> tuple[float, float]:
    """(seconds to check, seconds to load) for one load."""
    start = time.perf_counter()
    if mode == "path":
        assert _hash_file(path) == (length, sha)
        checked = time.perf_counter()
        interpreter = make_interpreter(runtime, model_path=str(path))
        loaded = time.perf_counter()
    else:
        with SealedModel.verified(path, path.name, length, sha) as sealed:
            checked = time.perf_counter()
            interpreter = make_interpreter(runtime, model_path=f"/proc/self/fd/{sealed.fd}")
            loaded = time.perf_counter()
    del interpreter
    return checked - start, loaded - checked


def _row(size: str, mode: str, times: list[tuple[float, float]]) -> str:
    def cell(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:8.1f} {max(values) * 1000:8.1f}"

    checks, loads = [t[0] for t in times], [t[1] for t in times]
    return f"{size:>6} {mode:>7}  {cell(checks)}  {cell(loads)}  {cell([c + d for c, d in times])}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run: does it still run")
    parser.add_argument("--sizes", default="1,30", help="model sizes in MiB")
    parser.add_argument("--runtime", default=default_runtime())
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.reps = "1", 2
    print(f"runtime {args.runtime}, {args.reps} loads each, interleaved; ms: median max")
    print(f"{'MiB':>6} {'mode':>7}  {'check':>17}  {'load':>17}  {'both':>17}")
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes.split(","):
            path = Path(folder) / f"model-{size}.tflite"
            path.write_bytes(build_large_mlp(int(float(size) * 2**20), seed=1))
            length, sha = _hash_file(path)
            times: dict[str, list[tuple[float, float]]] = {"path": [], "sealed": []}
            for _ in range(args.reps):
                for mode in times:
                    times[mode].append(_once(mode, path, length, sha, args.runtime))
            for mode, measured in times.items():
                print(_row(size, mode, measured))


if __name__ == "__main__":
    main()
