"""A TCP proxy for fault tests: forwards loopback connections to a server, optionally throttled, and can
cut every open connection. Runs its own event loop in a thread; it stops by itself when closed."""

from __future__ import annotations

import asyncio
import contextlib

from edgefleet.devtools.background import LoopThread


class FaultProxy(LoopThread):
    def __init__(self, target_port: int, bytes_per_second: float = 0):
        super().__init__()
        self.target_port = target_port
        self.bytes_per_second = bytes_per_second  # server -> client; 0 = unthrottled
        self.port = 0
        self.paused = False  # stop forwarding without closing anything: a stalled link
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def cut(self) -> None:
        """Drops every open connection (the client sees a broken link)."""
        asyncio.run_coroutine_threadsafe(self._cut(), self._loop).result(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()

    async def _cut(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        self._writers |= {client_w, server_w}
        await asyncio.gather(
            self._pipe(client_r, server_w, 0),
            self._pipe(server_r, client_w, self.bytes_per_second),
            return_exceptions=True,
        )
        for w in (client_w, server_w):
            self._writers.discard(w)
            w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(16384):
                while self.paused:  # noqa: ASYNC110 - flipped from another thread; polling is simplest
                    await asyncio.sleep(0.05)
                writer.write(data)
                await writer.drain()
                if rate:
                    await asyncio.sleep(len(data) / rate)
        writer.transport.abort()
