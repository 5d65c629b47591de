"""Background loops for tests and benches: `BackgroundLoop`, a task for as long as an `async with` block (what
the load tests sample while a fleet runs); `LoopThread`, an event loop of its own in a thread for as long as a
`with` block (the proxies and relays that stand between a server and real agents)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, TypeVar

Loop = TypeVar("Loop", bound="BackgroundLoop")
Threaded = TypeVar("Threaded", bound="LoopThread")


class BackgroundLoop:
    """Subclasses define `_run`; entering starts it as a task, leaving cancels it."""

    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    async def __aenter__(self: Loop) -> Loop:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class LoopThread:
    """Subclasses define `_start` and `_stop` (run on the thread's loop) and set `port`; entering starts the
    thread and `_start`, leaving runs `_stop` and closes the loop."""

    port = 0

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: Threaded) -> Threaded:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
