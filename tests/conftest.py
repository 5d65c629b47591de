"""Shared fixtures: real models built by edgefleet.devtools.modelgen, and a real local fleet (server + agent processes)."""

from __future__ import annotations

import fcntl
import os
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from edgefleet.devtools.localfleet import AgentProcess, LocalFleet
from edgefleet.devtools.modelgen import DigitsData, build_digits_model, load_digits_split
from edgefleet.durable import write_atomic
from edgefleet.runtime import RUNTIMES, available_runtimes
from edgefleet.server.storage.sql import sqlalchemy_url


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes, DigitsData]:
    """Two versions of the demo model (different training seeds) and the data they were trained on.
    Trained once per run, not once per xdist worker (a few seconds each): see `_built_once`."""
    cache = _run_folder(tmp_path_factory) / "digits-models"
    v1 = _built_once(cache / "seed-0.tflite", lambda: build_digits_model(seed=0)[0])
    v2 = _built_once(cache / "seed-1.tflite", lambda: build_digits_model(seed=1)[0])
    return v1, v2, load_digits_split()


def _run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This run's temp folder, shared by its xdist workers (each worker's own basetemp is a folder in it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _built_once(path: Path, build: Callable[[], bytes]) -> bytes:
    """`build()`'s bytes, built by the first worker to ask and read back by the others; the lock makes a
    second worker wait for the first instead of building too. The folder lives for one run only, so a
    change to modelgen can never be answered from a stale copy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            write_atomic(path, build())
        return path.read_bytes()


@pytest.fixture(scope="session")
def digits_files(
    tmp_path_factory: pytest.TempPathFactory, digits: tuple[bytes, bytes, DigitsData]
) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    v1, v2, data = digits
    (folder / "v1.tflite").write_bytes(v1)
    (folder / "v2.tflite").write_bytes(v2)
    np.savez(folder / "eval.npz", x=data.x_test, y=data.y_test)
    return {"v1": folder / "v1.tflite", "v2": folder / "v2.tflite", "eval": folder / "eval.npz"}


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    """Each TFLite runtime the project supports; skipped where it is not installed."""
    if request.param not in available_runtimes():
        pytest.skip(f"{request.param} is not installed")
    return str(request.param)


def database_url(backend: str, tmp_path: Path) -> str:
    """A fresh, empty database: a SQLite file under `tmp_path`, or the PostgreSQL database that scripts/test
    started (emptied first); skips the test when there is no PostgreSQL."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    url = os.environ.get("EDGEFLEET_TEST_POSTGRES_URL", "")
    if not url:
        pytest.skip("no PostgreSQL: scripts/test starts one (scripts/test-postgres)")
    url = _database_of_this_worker(url)
    engine = sa.create_engine(sqlalchemy_url(url))
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return url


_created: set[str] = set()


def _database_of_this_worker(url: str) -> str:
    """Under pytest-xdist each worker has a database of its own on the one PostgreSQL server (`<db>_gw0`, ...),
    created on first use: a worker runs one test at a time, so emptying it per test stays safe."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker:
        return url
    parts = urllib.parse.urlsplit(url)
    name = f"{parts.path.lstrip('/')}_{worker}"
    if name not in _created:
        engine = sa.create_engine(sqlalchemy_url(url), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                found = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
                if found.first() is None:
                    conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        _created.add(name)
    return parts._replace(path="/" + name).geturl()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[LocalFleet]:
    """A running server with fresh keys; agents started by the test are stopped afterwards."""
    f = LocalFleet(tmp_path / "fleet")
    f.init_keys()
    f.start_server()
    try:
        yield f
    finally:
        f.close()


def v1_running(fleet: LocalFleet, digits_files: dict[str, Path], *extra: str, **kwargs: Any) -> AgentProcess:
    """One agent ("cam") enrolled, with digits v1 pushed, deployed to all and running healthily."""
    agent = fleet.start_agent("cam", fleet.enrollment_token(), *extra, **kwargs)
    fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
    fleet.cli("deploy", "digits", "1", "--to", "all")
    fleet.wait_running(agent, "digits/1/float32.tflite")
    return agent


# Run alone, after the rest (scripts/test's second pass): the load tests assert on a server's memory, threads
# and timings (a reconnect stampede's spread, a fan-out's seconds), which tests running beside them on the same
# cores would distort. So does the real-agent rollout test: its shadow wave's statistics come from a niced
# candidate under a CPU budget on live traffic, which a loaded machine starves (its rollout then outwaits the
# test). The benches' quick runs assert only that they run and print figures: they run beside.
_ALONE = ("tests/load/", "tests/e2e/test_rollout_agents.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(str(config.rootpath))
    for item in items:
        if Path(str(item.path)).relative_to(root).as_posix().startswith(_ALONE):
            item.add_marker(pytest.mark.alone)


# Files whose module- or session-scoped fixtures are dear to build (a server and agents as processes,
# variants built and measured in child processes, a rollout rig of simulated devices). Under xdist's
# default `--dist load` each worker that draws one of their tests builds them again; these go to one worker
# as a whole instead, and every other test is spread one by one as before.
_ONE_WORKER = (
    "tests/e2e/test_deploy_validation.py",
    "tests/e2e/test_real_models_e2e.py",
    "tests/integration/test_compression.py",
    "tests/integration/test_fuzz.py",
    "tests/integration/test_real_models.py",
    "tests/integration/test_rollout_engine.py",
)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: only called where xdist is installed
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist load` with the _ONE_WORKER files kept whole. Not `--dist loadgroup` with xdist_group marks:
    xdist 3.8 marks a group in a node id field pytest 9.2 no longer reads (pytest-xdist issue #1386)."""
    if config.getvalue("dist") != "load":
        return None  # another --dist, chosen on the command line: xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class FilesKeptWhole(LoadScopeScheduling):
        # A scope is a unit of work that one worker runs: here a whole file or a single test. xdist sends
        # the scopes with the most tests first, so the kept files never make a tail at the end.
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if path in _ONE_WORKER else nodeid

    return FilesKeptWhole(config, log)
