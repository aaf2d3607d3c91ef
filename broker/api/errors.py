"""One middleware maps every error to a status, a JSON body and a log line
(``broker.api.requestlog``), and gathers each request's identifiers for that line."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from broker.api import requestlog
from broker.api.metrics import Metrics
from broker.errors import BrokerError
from broker.logs import noted, request_fields

log = logging.getLogger("broker.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_body(
    code: str, message: str, details: dict[str, str] | None = None
) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message, **(details or {})}}


def error_response(
    status: int,
    code: str,
    message: str,
    details: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.json_response(error_body(code, message, details), status=status, headers=headers)


def route_of(request: web.Request) -> str:
    """The route template a request matched (its metric and log label)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def note_refusal(metrics: Metrics, route: str, status: int, exc: BrokerError) -> None:
    """Count and log one refused request by the broker's own error code."""
    metrics.count_refused(exc.code, exc.issuer_name or "")
    requestlog.refused(route, status, exc.code, issuer=exc.issuer_name, **exc.details())


def make_middleware(metrics: Metrics) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        route = route_of(request)
        with request_fields(client=request.remote or "unknown"):
            response = await _answer(request, handler, route, metrics)
        metrics.requests.labels(
            route=route, method=request.method, status=str(response.status)
        ).inc()
        metrics.latency.labels(route=route).observe(time.perf_counter() - started)
        return response

    return middleware


async def _answer(
    request: web.Request, handler: Handler, route: str, metrics: Metrics
) -> web.StreamResponse:
    """The handler's response, or the refusal its error maps to (logged, counted)."""
    try:
        return await handler(request)
    except BrokerError as exc:
        note_refusal(metrics, route, exc.status, exc)
        return error_response(exc.status, exc.code, exc.message, exc.details())
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        too_large = exc.status == 413
        message = "the request body is too large" if too_large else exc.reason or "request refused"
        metrics.count_refused(code)
        requestlog.refused(route, exc.status, code)
        # A 405 says which methods the resource takes (RFC 9110 §15.5.6): aiohttp's Allow.
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, code, message, headers=allow)
    except Exception:
        log.exception("unhandled error", extra={**noted(), "route": route})
        return error_response(500, "internal_error", "the broker failed unexpectedly; see its log")
