"""Requests aiohttp refuses before the application sees them (a header past the server's
limit, a request line too long, bytes that are not HTTP), answered in the broker's JSON
error shape like every other refusal, instead of aiohttp's plain-text 400.

The header limit follows the identity settings: an identity token travels in
``Authorization: Bearer <token>``, so aiohttp's per-header limit (``max_field_size``,
counted over the header's name and value) is the largest ``max_token_bytes`` any issuer
accepts plus that framing plus slack. A token over its issuer's ``max_token_bytes`` but
under the header limit reaches the verifier (401 ``token_too_large``); a header over the
limit gets 431 ``header_too_large``. Neither answer nor the log line repeats any of the
header (aiohttp's own message quotes its first 100 bytes: part of a token).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from broker.api.errors import error_body

log = logging.getLogger("broker.api")

# Room for the other headers' sake and for "Authorization: Bearer " itself.
HEADER_SLACK_BYTES = 8 * 1024
_FRAMING = len("Authorization") + len("Bearer ")


def header_limit(max_token_bytes: int) -> int:
    """aiohttp's ``max_field_size`` for identity tokens of up to ``max_token_bytes``."""
    return max_token_bytes + _FRAMING + HEADER_SLACK_BYTES


def refusal(
    exc: BaseException | None, *, line_limit: int, field_limit: int
) -> tuple[int, str, str] | None:
    """(status, code, message) for a request aiohttp could not parse; None for anything
    else (aiohttp answers those itself). Pure: decided from the exception alone."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == line_limit and line_limit != field_limit:
            return 414, "uri_too_long", f"the request line is longer than {line_limit} bytes"
        return (
            431,
            "header_too_large",
            f"a request header is larger than the broker's limit of {field_limit} bytes",
        )
    if isinstance(exc, HttpProcessingError):
        return 400, "bad_request", "the request is not valid HTTP/1.1"
    return None


class _JsonRefusals(RequestHandler):
    """aiohttp's connection handler, with parse errors answered as JSON refusals."""

    __slots__ = ()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        answer = refusal(exc, line_limit=self.max_line_size, field_limit=self.max_field_size)
        if answer is None:
            return super().handle_error(request, status, exc, message)
        status, code, text = answer
        # Not HTTP at all on a fresh connection (a TLS hello, a port scan) is noise.
        level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.INFO
        log.log(
            level,
            "request refused before routing",
            extra={"status": status, "code": code, "client": request.remote},
        )
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent on this connection")
        response = web.json_response(error_body(code, text), status=status)
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonRefusals(self, loop=self._loop, **self._kwargs)


class JsonRefusalsRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer unparsable requests with JSON."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the same server; only its handler factory differs
        return server
