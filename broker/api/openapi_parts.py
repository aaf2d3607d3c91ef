"""What every module of the OpenAPI document (``broker.api.openapi*``) builds with: an
error answer, a JSON body, a success answer, the admin security requirement, and the
refusals any request can get before it is routed."""

from __future__ import annotations

from typing import Any

ERROR = {"$ref": "#/components/schemas/Error"}
ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]


def err(desc: str) -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": ERROR}}}


def body(schema: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def ok(desc: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    if schema is None:
        return {"description": desc}
    return {"description": desc, "content": {"application/json": {"schema": schema}}}


# Answered by the HTTP layer before routing (``broker.app.http_refusals``), on any path.
_BEFORE_ROUTING = {
    "400": "the request is not valid HTTP/1.1 (bad_request)",
    "414": "the request line is too long (uri_too_long)",
    "431": "a request header is larger than the broker's limit (header_too_large)",
}


def with_refusals_before_routing(paths: dict[str, Any]) -> dict[str, Any]:
    """``paths`` with the pre-routing refusals among every operation's responses (an
    operation's own 400, which says more, is kept)."""
    for operations in paths.values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status, desc in _BEFORE_ROUTING.items():
                responses.setdefault(status, err(desc))
    return paths
