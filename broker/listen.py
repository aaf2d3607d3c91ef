"""Listening sockets for the broker's servers (the API, the injector, the agent's ready
endpoint): bound early, so a port already in use stops start-up with one line that names
the address, before anything else is opened (and, for ``broker dev``, before OpenBao is
started).

Binding without listening already claims the address against a server that listens on it;
the socket is then handed to aiohttp, which listens on it when it starts serving.
"""

from __future__ import annotations

import errno
import socket

from broker.errors import StartupFailure


def show_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_problem(host: str, port: int, code: int | None, strerror: str | None) -> str:
    """The line an operator reads when ``host:port`` cannot be bound (pure)."""
    where = f"address {show_address(host, port)}"
    if code == errno.EADDRINUSE:
        return f"{where} is already in use: stop what listens there or choose another port"
    if code == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need privileges)"
    if code == errno.EADDRNOTAVAIL:
        return f"{where}: not an address of this machine"
    return f"{where} cannot be bound ({strerror or 'unknown error'})"


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: any free port) and listening, so no other
    socket can take the port meanwhile (a bound socket that does not listen leaves it to
    any other ``SO_REUSEADDR`` socket); a ``StartupFailure`` that says why when the address
    cannot be had. Serving on it later (aiohttp listens again) is harmless."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except socket.gaierror:
        # A name, not an address: let the resolver pick the family.
        try:
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except socket.gaierror:
            raise StartupFailure(
                f"address {show_address(host, port)}: the host name does not resolve"
            ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen()
    except OSError as exc:
        sock.close()
        raise StartupFailure(bind_problem(host, port, exc.errno, exc.strerror)) from None
    return sock


def ensure_free(host: str, port: int) -> None:
    """Fail now, with the same line, if ``host:port`` is taken (a check before a slow
    start-up; the server binds again when it starts)."""
    if port:
        bind_socket(host, port).close()
