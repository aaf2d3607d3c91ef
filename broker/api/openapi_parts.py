"""What every module of the OpenAPI document (``broker.api.openapi*``) builds with: an
error answer, a JSON body, a success answer, the admin security requirement, the shared
field schemas (kept equal to what ``broker.api.decode`` accepts), and the refusals any
request can get before it is routed."""

from __future__ import annotations

from typing import Any

from broker.api.decode import MAX_INCIDENT, MAX_REASON, PRINTABLE_CLASS, PRINTABLE_PATTERN
from broker.durations import MAX_SECONDS

ERROR = {"$ref": "#/components/schemas/Error"}
ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]
TIME = {"type": "string", "format": "date-time"}
NULL_TIME = {"type": ["string", "null"], "format": "date-time"}
ROLE = {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"}
LEASE_ID = {"type": "string", "pattern": "^l-[0-9a-f]{32}$"}
JOB_ID = {"type": "string", "pattern": "^j-[0-9a-f]{32}$"}
# ``decode.ttl``: seconds (1 to 10 years) or a duration; null or absent: the default.
TTL = {
    "type": ["string", "integer", "null"],
    "description": "seconds, or a duration like 90s, 10m, 1h30m, 7d; at least 1s, at most "
    "10 years; capped by the role and rule",
    "minimum": 1,
    "maximum": MAX_SECONDS,
    "pattern": "^(?:[1-9][0-9]{0,7}|[1-9][0-9]{0,2}(?:s|m|h|d))$",
}
REASON = {
    "type": ["string", "null"],
    "maxLength": MAX_REASON,
    "pattern": PRINTABLE_PATTERN,
    "description": "printable text; kept in the audit event",
}
INCIDENT = {
    "type": ["string", "null"],
    "maxLength": MAX_INCIDENT,
    "pattern": f"^(?:[^{PRINTABLE_CLASS} ](?:[^{PRINTABLE_CLASS}]*[^{PRINTABLE_CLASS} ])?)?$",
    "description": "an incident reference (e.g. INC-1234 or a ticket URL), printable, "
    "without surrounding spaces",
}


def or_empty(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter's schema, or empty: an admin GET takes ``x=`` as if x were absent."""
    return {"anyOf": [schema, {"type": "string", "maxLength": 0}]}


def err(desc: str) -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": ERROR}}}


def body(schema: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def ok(desc: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    if schema is None:
        return {"description": desc}
    return {"description": desc, "content": {"application/json": {"schema": schema}}}


def obj(properties: dict[str, Any], *optional: str, **extra: Any) -> dict[str, Any]:
    """An object schema whose properties are all required but ``optional``."""
    return {
        "type": "object",
        "required": [k for k in properties if k not in optional],
        "properties": properties,
        **extra,
    }


STORE_DOWN = err("the lease store is unavailable (store_unavailable); try again")
VAULT_ERRORS = {
    "502": err("Vault refused the broker's request (vault_error, vault_token_invalid)"),
    "503": err("Vault or the lease store is unavailable (vault_unavailable, store_unavailable)"),
}

# Answered by the HTTP layer before routing (``broker.app.http_refusals``), on any path.
_BEFORE_ROUTING = {
    "400": "the request is not valid HTTP/1.1 (bad_request)",
    "414": "the request line is too long (uri_too_long)",
    "431": "a request header is larger than the broker's limit (header_too_large)",
}
_TOO_LARGE = "the request body is larger than the broker's limit (payload_too_large)"


def with_refusals_before_routing(paths: dict[str, Any]) -> dict[str, Any]:
    """``paths`` with the pre-routing refusals among every operation's responses (an
    operation's own 400, which says more, is kept), and 413 on those that take a body."""
    for operations in paths.values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status, desc in _BEFORE_ROUTING.items():
                responses.setdefault(status, err(desc))
            if "requestBody" in operation:
                responses.setdefault("413", err(_TOO_LARGE))
    return paths
