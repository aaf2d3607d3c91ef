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

Each such refusal is counted and logged as every other one is: in the refusal metric by
its code (no issuer: no token was read) and in the one ``request refused`` line
(``broker.api.requestlog``, route ``unparsed``). These requests never reach the
application or its middleware, so the count is handed down to the connection handler as
an explicit collaborator (``RefusalCount``) with the server's other settings.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from broker.api import requestlog
from broker.api.errors import error_body
from broker.logs import request_fields

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


class RefusalCount(Protocol):
    """Where refusals are counted (``broker.api.metrics.Metrics``)."""

    def count_refused(self, code: str, issuer: str = "") -> None: ...


class _JsonRefusals(RequestHandler):
    """aiohttp's connection handler, with parse errors answered as JSON refusals, counted
    in ``counted`` (when given) and logged."""

    __slots__ = ("_counted",)

    def __init__(
        self, manager: web.Server, *, counted: RefusalCount | None = None, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._counted = counted

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
        if self._counted is not None:
            self._counted.count_refused(code)
        # Not HTTP at all (a TLS hello, a port scan) is noise in the log, not in the count.
        with request_fields(client=request.remote or "unknown"):
            requestlog.refused_unparsed(status, code, noise=isinstance(exc, BadHttpMethod))
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent on this connection")
        response = web.json_response(error_body(code, text), status=status)
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonRefusals(self, loop=self._loop, **self._kwargs)


class JsonRefusalsRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer unparsable requests with JSON, counting
    each in ``counted``. aiohttp hands the runner's keyword arguments to the server, which
    hands them to every connection handler (``_Server``): that is how ``counted`` reaches
    ``_JsonRefusals``."""

    def __init__(
        self, app: web.Application, *, counted: RefusalCount | None = None, **kwargs: Any
    ) -> None:
        super().__init__(app, counted=counted, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the same server; only its handler factory differs
        return server
