"""One middleware maps every error to a status, a JSON body and a log level."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from broker.api.metrics import Metrics
from broker.errors import BrokerError

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
    status: int, code: str, message: str, details: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(error_body(code, message, details), status=status)


def make_middleware(metrics: Metrics) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        try:
            response = await handler(request)
        except BrokerError as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.details())
            metrics.refused.labels(code=exc.code, issuer=exc.issuer_name or "").inc()
            level = logging.WARNING if exc.status >= 500 else logging.INFO
            log.log(
                level,
                "request refused",
                extra={"route": route, "status": exc.status, "code": exc.code},
            )
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = _HTTP_CODES.get(exc.status, "http_error")
            message = (
                "the request body is too large"
                if exc.status == 413
                else exc.reason or "request refused"
            )
            response = error_response(exc.status, code, message)
            metrics.refused.labels(code=code, issuer="").inc()
        except Exception:
            log.exception("unhandled error", extra={"route": route})
            response = error_response(
                500, "internal_error", "the broker failed unexpectedly; see its log"
            )
        metrics.requests.labels(
            route=route, method=request.method, status=str(response.status)
        ).inc()
        metrics.latency.labels(route=route).observe(time.perf_counter() - started)
        return response

    return middleware
