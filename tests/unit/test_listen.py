"""A listening address that cannot be had: one line naming it and why (pure), and the
bound socket the servers are handed."""

from __future__ import annotations

import errno
import socket

import pytest

from broker.errors import StartupFailure
from broker.listen import bind_problem, bind_socket, ensure_free


@pytest.mark.parametrize(("code", "line"), [
    (errno.EADDRINUSE, "address 127.0.0.1:8300 is already in use: stop what listens there or "
                       "choose another port"),
    (errno.EACCES, "address 127.0.0.1:8300: permission denied (ports below 1024 need "
                   "privileges)"),
    (errno.EADDRNOTAVAIL, "address 127.0.0.1:8300: not an address of this machine"),
    (errno.EINVAL, "address 127.0.0.1:8300 cannot be bound (Invalid argument)"),
], ids=["in-use", "denied", "not-ours", "other"])
def test_each_bind_failure_is_one_line(code: int, line: str) -> None:
    assert bind_problem("127.0.0.1", 8300, code, "Invalid argument") == line


def test_ipv6_addresses_are_bracketed() -> None:
    assert bind_problem("::1", 8300, errno.EADDRINUSE, None).startswith("address [::1]:8300 ")


def test_a_port_that_is_listened_on_is_refused_by_name() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupFailure, match=f"address 127.0.0.1:{port} is already in use"):
            bind_socket("127.0.0.1", port)
        with pytest.raises(StartupFailure, match="is already in use"):
            ensure_free("127.0.0.1", port)


def test_port_zero_binds_any_free_port_and_is_never_checked() -> None:
    ensure_free("127.0.0.1", 0)
    with bind_socket("127.0.0.1", 0) as sock:
        assert sock.getsockname()[1] != 0


def test_a_host_that_does_not_resolve_says_so() -> None:
    with pytest.raises(StartupFailure, match="the host name does not resolve"):
        bind_socket("no-such-host.invalid", 0)


def test_a_claimed_port_cannot_be_taken_by_another_reuseaddr_socket() -> None:
    """Bound alone, the port would still go to any other SO_REUSEADDR socket that binds and
    listens; the claim listens, so that bind fails."""
    with bind_socket("127.0.0.1", 0) as claimed:
        port = claimed.getsockname()[1]
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError) as caught:
                other.bind(("127.0.0.1", port))
                other.listen()
            assert caught.value.errno == errno.EADDRINUSE
