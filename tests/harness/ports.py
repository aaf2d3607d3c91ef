"""Ports for the servers the tests start, without the race of choosing one first.

A port chosen by binding port 0, closing the socket and handing the number on to a server
that binds it later is free only at the moment it was chosen: on a busy machine, where
other test runs (and every outgoing connection) take ports too, another process may bind
it in between. So:

- a server in the test's own process serves on a socket that was bound once and kept:
  ``held_socket`` binds port 0 and ``serve_app`` serves an aiohttp application on it
  (the port is known before the application is built, as an issuer's URL needs);
- a server in another process that can only be given a number is started again on a new
  number when it exits because the port was taken (``port_taken`` reads its log).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

from aiohttp import web

from broker.dev.openbao import OpenBaoDevServer

HOST = "127.0.0.1"
ATTEMPTS = 5  # starts of a subprocess server, each on a newly chosen port

# asyncio: "[Errno 98] error while attempting to bind on address (...): address already
# in use"; the broker's own one-line refusal: "address 127.0.0.1:8300 is already in use".
_TAKEN = re.compile(r"already in use|\[Errno 98\]|EADDRINUSE", re.IGNORECASE)


def held_socket(host: str = HOST) -> socket.socket:
    """A TCP socket bound to a port the kernel chose and listening, kept until it is served
    on (``serve_app``) or closed: nothing else can take that port meanwhile (a socket that
    is only bound leaves it to any other ``SO_REUSEADDR`` socket that binds and listens)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen()
    return sock


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


async def serve_app(app: web.Application, sock: socket.socket | None = None,
                    **runner_options: object) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``sock`` (a new ``held_socket`` if none): the runner, to clean up,
    and the port."""
    sock = sock or held_socket()
    runner = web.AppRunner(app, **runner_options)  # type: ignore[arg-type]
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner, port_of(sock)


def port_taken(log_text: str) -> bool:
    """Whether a server's log says it could not bind because the port was in use."""
    return bool(_TAKEN.search(log_text))


def started_openbao(workdir: Path, timeout: float = 120.0) -> OpenBaoDevServer:
    """An OpenBao dev server, started (on a busy machine it may take a while: ``timeout``)
    and on a newly chosen port again if another process bound the first one meanwhile."""
    for attempt in range(1, ATTEMPTS + 1):
        server = OpenBaoDevServer(workdir)
        try:
            server.start(timeout)
            return server
        except RuntimeError:
            log = workdir / "openbao.log"
            said = log.read_text(errors="replace") if log.exists() else ""
            if attempt == ATTEMPTS or not port_taken(said):
                raise
    raise AssertionError("unreachable")
