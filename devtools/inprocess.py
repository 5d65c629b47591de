"""A real fleet server in this process, on 127.0.0.1 with OS-chosen ports and fresh TUF keys.

    server = await InProcessServer.start(folder)   # start_server(ServerConfig(...)) on port 0, both ports
    server.fleet, server.address                    # what the RPCs reach, and where
    await server.close()

For tests that speak gRPC to the server (tests/rpc_harness.py builds its `Harness` on it) and benchmarks
that call its `Fleet` directly (bench/deploy_scale.py). `running_server` is the same as a context manager.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

from edgefleet import signing
from edgefleet.server.app import RunningServer, ServerConfig, start_server
from edgefleet.server.fleet import Fleet

S = TypeVar("S", bound="InProcessServer")


class InProcessServer:
    """One running server (`running`, `fleet`) with its data under `folder/data` and its keys."""

    def __init__(self, folder: Path, running: RunningServer, keys: signing.KeyFiles):
        self.folder = folder
        self.running = running
        self.keys = keys
        self.data_dir = folder / "data"

    @classmethod
    async def start(cls: type[S], folder: Path, keys: signing.KeyFiles | None = None, **config: Any) -> S:
        """Fresh TUF keys (unless given) and a server on 127.0.0.1 with OS-chosen ports; `config` overrides
        ServerConfig fields."""
        folder.mkdir(parents=True, exist_ok=True)
        keys = keys or signing.init_keys(folder / "keys")
        running = await start_server(
            ServerConfig(
                data_dir=folder / "data",
                listen="127.0.0.1:0",
                enroll_listen="127.0.0.1:0",
                trust_root=keys.trust_root,
                online_key=keys.online,
                grace_seconds=0,
                **config,
            )
        )
        return cls(folder, running, keys)

    async def close(self) -> None:
        await self.running.stop(0)

    @property
    def fleet(self) -> Fleet:
        return self.running.fleet

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    @property
    def enroll_address(self) -> str:
        return f"127.0.0.1:{self.running.enroll_port}"


@contextlib.asynccontextmanager
async def running_server(folder: Path, **config: Any) -> AsyncIterator[InProcessServer]:
    server = await InProcessServer.start(folder, **config)
    try:
        yield server
    finally:
        await server.close()
