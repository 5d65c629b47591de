"""A loop that runs in the background for as long as an `async with` block: what the load tests and benches
sample while a fleet runs."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, TypeVar

Loop = TypeVar("Loop", bound="BackgroundLoop")


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
