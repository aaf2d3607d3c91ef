"""The HTTP server as a supervised part: bound at start (so the URL is known before the
broker reports it started), served until the broker stops.

With ``server.tls`` it serves HTTPS with the certificate in the files, re-read while it
runs when they change (``broker.tls``): new handshakes get the new certificate, open
connections keep theirs. Without it, plain HTTP: fine on loopback, and behind a proxy or
mesh that terminates TLS; anywhere else identity tokens and credentials would cross the
network in clear text, so start-up says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from aiohttp import web

from broker.app.http_refusals import JsonRefusalsRunner, RefusalCount, header_limit
from broker.config import ServerTlsSettings
from broker.errors import StartupFailure
from broker.listen import bind_problem, bind_socket
from broker.settings import is_loopback
from broker.tls import CertificateReloader

log = logging.getLogger(__name__)
# Identity tokens up to 64 KiB travel in a header; aiohttp's default limit is 8 KiB. The
# broker passes the limit its issuers' max_token_bytes need (``header_limit``).
MAX_HEADER_BYTES = header_limit(64 * 1024)
MAX_LINE_BYTES = 16 * 1024
# A request in flight when the broker stops may be between Vault and the ledger: it gets
# this long to record what Vault issued (or take it back) before the database and the
# Vault client close under it. aiohttp's own default; the issuance deadline
# (``revocation.issuing_timeout_s / 2``) is normally shorter.
DRAIN_S = 60.0


class HttpServer:
    name = "http"
    stop_s = DRAIN_S + 5.0  # the drain, and a margin to close the listening socket

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        tls: ServerTlsSettings | None = None,
        *,
        max_header_bytes: int = MAX_HEADER_BYTES,
        counted: RefusalCount | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._tls_settings = tls
        self.max_header_bytes = max_header_bytes
        # A request aiohttp cannot parse (a header over max_header_bytes) gets the broker's
        # JSON refusal, not aiohttp's plain text, counted in ``counted`` with the others
        # (``broker.app.http_refusals``).
        self._runner = JsonRefusalsRunner(
            app,
            counted=counted,
            access_log=None,
            handler_cancellation=False,
            max_field_size=max_header_bytes,
            max_line_size=MAX_LINE_BYTES,
            shutdown_timeout=DRAIN_S,
        )
        self.tls: CertificateReloader | None = None
        self.url: str | None = None
        self._bound = False
        self._socket: socket.socket | None = None

    def load_certificate(self) -> None:
        """Read the serving certificate, if one is configured: ``ConfigError`` naming the
        file that is missing or does not load. Called before the broker opens anything
        else, so a bad pair stops it at once."""
        if self._tls_settings is not None and self.tls is None:
            files = self._tls_settings
            self.tls = CertificateReloader(files.cert_file, files.key_file, where="server.tls")

    def claim_address(self) -> None:
        """Bind the address now (``StartupFailure`` naming it when it is taken), so a port
        in use stops start-up before the store, Vault and the rest are opened; ``bind``
        then serves on this socket. ``close`` releases it if serving never started."""
        if self._socket is None:
            self._socket = bind_socket(self._host, self._port)

    async def bind(self) -> str:
        """Listen, and return the URL (with the port the system chose for port 0)."""
        self.load_certificate()
        self.claim_address()
        await self._runner.setup()
        self._bound = True
        sock, self._socket = self._socket, None
        assert sock is not None
        context = self.tls.server_context if self.tls is not None else None
        try:
            await web.SockSite(self._runner, sock, ssl_context=context).start()
        except OSError as exc:  # the same one line as a bind that fails
            sock.close()
            raise StartupFailure(
                bind_problem(self._host, self._port, exc.errno, exc.strerror)
            ) from None
        host, port = sock.getsockname()[:2]
        scheme = "https" if self.tls is not None else "http"
        self.url = f"{scheme}://{host if ':' not in host else f'[{host}]'}:{port}"
        if self.tls is None and not is_loopback(self._host):
            log.warning(
                "serving plain HTTP on a non-loopback address: identity tokens and "
                "credentials cross the network in clear text unless a proxy or service "
                "mesh in front of the broker terminates TLS; otherwise set server.tls",
                extra={"host": self._host, "port": port},
            )
        return self.url

    async def run(self, stop: asyncio.Event) -> None:
        if self.tls is None or self._tls_settings is None:
            await stop.wait()
        else:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._tls_settings.reload_s)
                self.tls.check()
        await self.close()

    async def close(self) -> None:
        """Stop listening and finish the requests in flight. Idempotent."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._bound:
            self._bound = False
            await self._runner.cleanup()
