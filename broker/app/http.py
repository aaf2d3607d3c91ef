"""The HTTP server as a supervised part: bound at start (so the URL is known before the
broker reports it started), served until the broker stops."""

from __future__ import annotations

import asyncio
import socket

from aiohttp import web

# Identity tokens up to 64 KiB travel in a header; aiohttp's default limit is 8 KiB.
MAX_HEADER_BYTES = 72 * 1024
MAX_LINE_BYTES = 16 * 1024
# A request in flight when the broker stops may be between Vault and the ledger: it gets
# this long to record what Vault issued (or take it back) before the database and the
# Vault client close under it. aiohttp's own default; the issuance deadline
# (``revocation.issuing_timeout_s / 2``) is normally shorter.
DRAIN_S = 60.0


class HttpServer:
    name = "http"
    stop_s = DRAIN_S + 5.0  # the drain, and a margin to close the listening socket

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=False,
            max_field_size=MAX_HEADER_BYTES,
            max_line_size=MAX_LINE_BYTES,
            shutdown_timeout=DRAIN_S,
        )
        self.url: str | None = None
        self._bound = False

    async def bind(self) -> str:
        """Listen, and return the URL (with the port the system chose for port 0)."""
        await self._runner.setup()
        self._bound = True
        sock = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        await web.SockSite(self._runner, sock).start()
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        return self.url

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()
        await self.close()

    async def close(self) -> None:
        """Stop listening and finish the requests in flight. Idempotent."""
        if self._bound:
            self._bound = False
            await self._runner.cleanup()
