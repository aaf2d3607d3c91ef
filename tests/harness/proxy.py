"""A small fault-injecting TCP proxy in front of a real server (OpenBao, PostgreSQL).

``cut()`` drops every connection and refuses new ones until ``restore()``. ``hold_on``
freezes the connection whose client sends a given byte pattern (e.g. an HTTP request
line) and sets ``held``, so a test can act (kill -9 the client) at exactly that point.
"""

from __future__ import annotations

import asyncio
import contextlib


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.cut_off = False
        self.hold_on: bytes | None = None
        self.held = asyncio.Event()
        self.seen: list[bytes] = []
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._drop_all()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def cut(self) -> None:
        self.cut_off = True
        self._drop_all()

    def restore(self) -> None:
        self.cut_off = False

    def release(self) -> None:
        """Stop holding; frozen connections are dropped (their client is dead anyway)."""
        self.hold_on = None
        self._drop_all()

    def _drop_all(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update({writer, up_writer})

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool):
            try:
                while data := await src.read(65536):
                    if upstream and self.hold_on is not None and self.hold_on in data:
                        self.held.set()
                        await asyncio.Event().wait()  # frozen until the connection drops
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError, OSError):
                pass
            finally:
                dst.transport.abort()

        tasks = [asyncio.ensure_future(pump(reader, up_writer, True)),
                 asyncio.ensure_future(pump(up_reader, writer, False))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            self._writers.discard(writer)
            self._writers.discard(up_writer)
            writer.transport.abort()
            up_writer.transport.abort()
