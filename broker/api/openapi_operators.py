"""The OpenAPI paths of operators and locks (``broker.api.openapi`` puts them in)."""

from __future__ import annotations

from typing import Any

from broker.api.openapi_parts import (
    ADMIN,
    ERROR,
    INCIDENT,
    NULL_TIME,
    REASON,
    STORE_DOWN,
    TIME,
    TTL,
    err,
    ok,
)

_SAID = {"reason": REASON, "incident": INCIDENT}
# Admin calls are refused with 401 (no token, an operator JWT refused) or 403 (a token of
# nobody, a scope too small); every refusal is audited as admin.refused.
ADMIN_ERRORS = {
    "401": {
        "description": "admin token missing, or an operator JWT refused",
        "content": {"application/json": {"schema": ERROR}},
    },
    "403": {
        "description": "not an operator's token, or the operator's scope is too small",
        "content": {"application/json": {"schema": ERROR}},
    },
    "503": STORE_DOWN,
}
SAID_BODY = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {"type": "object", "additionalProperties": False, "properties": _SAID}
        }
    },
}
_LOCK_ID = {"type": "string", "pattern": "^k-[0-9a-f]{32}$"}
_KIND = {"type": "string", "enum": ["workload", "issuer", "role", "claim"]}
LOCK: dict[str, Any] = {
    "type": "object",
    "required": [
        "lock_id",
        "kind",
        "value",
        "claim",
        "reason",
        "incident",
        "created_by",
        "created_at",
        "expires_at",
        "removed_at",
        "removed_by",
    ],
    "properties": {
        "lock_id": _LOCK_ID,
        "kind": _KIND,
        "value": {"type": "string"},
        "claim": {"type": ["string", "null"]},
        "reason": {"type": "string"},
        "incident": {"type": ["string", "null"]},
        "created_by": {"type": "string"},
        "created_at": TIME,
        "expires_at": NULL_TIME,
        "removed_at": NULL_TIME,
        "removed_by": {"type": ["string", "null"]},
    },
}


def operator_paths() -> dict[str, Any]:
    return {
        "/v1/admin/whoami": {
            "get": {
                "summary": "The operator the presented token is (scope read)",
                "security": ADMIN,
                "responses": {
                    "200": ok(
                        "name, scope (read, revoke, admin) and how it authenticated",
                        {
                            "type": "object",
                            "required": ["name", "scope", "via"],
                            "properties": {
                                "name": {"type": "string"},
                                "scope": {"type": "string", "enum": ["read", "revoke", "admin"]},
                                "via": {"type": "string", "enum": ["token", "oidc"]},
                            },
                        },
                    ),
                    "400": err("a query parameter (it takes none: unknown_query)"),
                    **ADMIN_ERRORS,
                },
            }
        },
        "/v1/admin/locks": {
            "post": {
                "summary": "Lock: refuse every new credential and renewal that matches, on "
                "every replica at once, terminating nothing (scope revoke)",
                "security": ADMIN,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["kind", "value", "reason"],
                                "properties": {
                                    "kind": _KIND,
                                    "value": {"type": "string", "minLength": 1, "maxLength": 255},
                                    "claim": {
                                        "type": "string",
                                        "description": "kind claim: the claim's name "
                                        "(nested: a.b); a list claim matches when it holds "
                                        "the value",
                                    },
                                    "ttl": TTL,
                                    **_SAID,
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "201": ok(
                        "the lock",
                        {"type": "object", "required": ["lock"], "properties": {"lock": LOCK}},
                    ),
                    "400": err(
                        "invalid_lock: a lock that could never match (no such role or issuer "
                        "configured), a value or claim that is not printable, a bad ttl, "
                        "reason or incident; malformed_json, unknown_field"
                    ),
                    **ADMIN_ERRORS,
                },
            },
            "get": {
                "summary": "Active locks; all=true adds removed and expired ones (scope read)",
                "security": ADMIN,
                "parameters": [
                    {
                        "name": "all",
                        "in": "query",
                        "description": "empty: as if absent",
                        "schema": {"type": "string", "enum": ["true", "false", ""]},
                    }
                ],
                "responses": {
                    "200": ok(
                        "locks",
                        {
                            "type": "object",
                            "required": ["locks"],
                            "properties": {"locks": {"type": "array", "items": LOCK}},
                        },
                    ),
                    "400": err("an unknown (unknown_query) or bad (invalid_query) parameter"),
                    **ADMIN_ERRORS,
                },
            },
        },
        "/v1/admin/locks/{lock_id}": {
            "delete": {
                "summary": "Remove a lock (idempotent; scope revoke)",
                "security": ADMIN,
                "parameters": [
                    {
                        "name": "lock_id",
                        "in": "path",
                        "required": True,
                        "schema": _LOCK_ID,
                    }
                ],
                "requestBody": SAID_BODY,
                "responses": {
                    "200": ok(
                        "the lock, removed",
                        {"type": "object", "required": ["lock"], "properties": {"lock": LOCK}},
                    ),
                    "400": err("malformed_json, unknown_field, invalid_reason, invalid_incident"),
                    "404": err("lock_not_found"),
                    **ADMIN_ERRORS,
                },
            }
        },
    }
