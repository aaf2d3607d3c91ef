"""A request's outcome, one log line, written here and nowhere else: ``served`` for a
workload's credential issued, lease renewed or released, instance ending itself;
``refused`` (from the error middleware, or from the HTTP layer for a request it could not
parse) for every refusal, whatever the door.

Each line carries what the request gathered while it was served
(``broker.logs.note_request``): ``client`` (the peer address), ``issuer``,
``instance_id``, ``workload`` once the token is verified, ``role``, ``lease_id``,
``operator`` on admin endpoints, and on a refusal ``route`` (``unparsed`` for a request
the HTTP parser refused, ``broker.app.http_refusals``), ``status``, ``code`` (the
error body's code) and what the body itself shows (``lock_id``), with policy's ``reason``
that the body does not. Identifiers only: never a token or a credential."""

from __future__ import annotations

import logging
from typing import Any

from broker.logs import noted

log = logging.getLogger("broker.api")

ISSUED = "credential issued"
RENEWED = "lease renewed"
RELEASED = "lease released"
SELF_TERMINATED = "instance terminating itself"
REFUSED = "request refused"
UNPARSED = "unparsed"  # the route of a request the HTTP parser refused


def _line(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in {**noted(), **fields}.items() if v is not None}


def served(message: str, **fields: Any) -> None:
    """A workload request done: ``message`` (one of the constants above) at info."""
    log.info(message, extra=_line(fields))


def refused(
    route: str, status: int, code: str, *, issuer: str | None = None, **details: str
) -> None:
    """A refusal: at info, at warning for a 5xx (the broker or Vault failed, not the
    caller). ``issuer``: the one a token was refused for, where only the error knows it."""
    line = _line({"route": route, "status": status, "code": code, **details})
    if issuer and "issuer" not in line:
        line["issuer"] = issuer
    log.log(logging.WARNING if status >= 500 else logging.INFO, REFUSED, extra=line)


def refused_unparsed(status: int, code: str, *, noise: bool) -> None:
    """A request the HTTP parser refused (route ``unparsed``: it never had one): at info,
    at debug for ``noise`` (bytes that are not HTTP: a TLS hello, a port scan). Nothing of
    the request itself: its header or request line may hold a token."""
    line = _line({"route": UNPARSED, "status": status, "code": code})
    log.log(logging.DEBUG if noise else logging.INFO, REFUSED, extra=line)
