"""The OpenAPI paths of the audit trail: its events read out, and its verification
(``broker.api.openapi`` puts them in)."""

from __future__ import annotations

from typing import Any

from broker.api.openapi_operators import ADMIN_ERRORS
from broker.api.openapi_parts import ADMIN, body, err, ok, or_empty
from broker.api.queries import MAX_VALUE, TEXT_PATTERN
from broker.audit.collected import MAX_BODY, MAX_CHECKPOINTS, MAX_LINE

_ADMIN_ERRS = ADMIN_ERRORS
_TEXT = {"type": "string", "maxLength": MAX_VALUE, "pattern": TEXT_PATTERN}
_SEQ = {"type": ["integer", "null"]}
_AUDIT_REPORT: dict[str, Any] = {
    "type": "object",
    "required": ["ok", "from_seq", "events", "findings", "signatures_checked"],
    "properties": {
        "ok": {"type": "boolean"},
        # false while ok is false: only signatures that could not be checked now
        "tampered": {"type": "boolean"},
        "from_seq": {"type": "integer"},
        "last_seq": _SEQ,
        "events": {"type": "integer"},
        "first_bad_seq": _SEQ,
        "checkpoints": {"type": "integer"},
        "last_checkpoint_seq": _SEQ,
        "after_last_checkpoint": {"type": "integer"},
        "signatures_checked": {"type": "boolean"},
        "findings": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "kind": {"type": "string"},
                    "seq": {"type": "integer"},
                    "message": {"type": "string"},
                },
            },
        },
        "findings_omitted": {"type": "integer"},
        "notices": {"type": "array", "items": {"type": "string"}},
    },
}


def audit_paths() -> dict[str, Any]:
    return {
        "/v1/admin/audit/events": {
            "get": {
                "summary": "Audit events after a sequence number that match every "
                "selector given, oldest first (read scope); follow ``next`` for more",
                "security": ADMIN,
                "parameters": [
                    {
                        "name": "after",
                        "in": "query",
                        "schema": or_empty({"type": "integer", "minimum": 0, "maximum": 2**63 - 1}),
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": or_empty(
                            {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}
                        ),
                    },
                    {
                        "name": "newest",
                        "in": "query",
                        "description": "true: the last `limit` events (a tail)",
                        "schema": or_empty({"type": "boolean", "default": False}),
                    },
                    *(
                        {
                            "name": name,
                            "in": "query",
                            "schema": _TEXT,
                        }
                        for name in ("instance", "lease", "workload", "role", "action", "actor")
                    ),
                    {
                        "name": "since",
                        "in": "query",
                        "description": "an RFC 3339 time; empty: as if absent",
                        "schema": {
                            "type": "string",
                            "anyOf": [{"format": "date-time"}, {"maxLength": 0}],
                        },
                    },
                ],
                "responses": {
                    "200": ok(
                        "events, and the cursor of the next page (null: no more)",
                        {
                            "type": "object",
                            "required": ["events", "next"],
                            "properties": {
                                "events": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/AuditEvent"},
                                },
                                "next": {"type": ["integer", "null"]},
                            },
                        },
                    ),
                    "400": err("a bad (invalid_query) or unknown (unknown_query) query parameter"),
                    "404": err("this broker does not serve its audit events (not_found)"),
                    **_ADMIN_ERRS,
                },
            }
        },
        "/v1/admin/audit/verify": {
            "post": {
                "summary": "Recompute the audit chain from a seq (or its start) to its "
                "head: every link, checkpoint and signature (also of the checkpoints the "
                "caller collected); findings name their seq",
                "security": ADMIN,
                "requestBody": body(
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "from": {"type": "integer", "minimum": 1},
                            "checkpoints": {
                                "type": "array",
                                "maxItems": MAX_CHECKPOINTS,
                                "items": {"type": "string", "maxLength": MAX_LINE},
                            },
                        },
                        "description": "from: a sequence number, 1 or more (default 1); "
                        "checkpoints: checkpoint lines the operator collected (a line of a "
                        "checkpoint file, or an audit.checkpoint log record; blank lines "
                        "skipped, duplicates kept once), held against the chain with the "
                        "broker's own; the body at most "
                        f"{MAX_BODY // (1024 * 1024)} MiB",
                    },
                    required=False,
                ),
                "responses": {
                    "200": ok("the verification report (ok: every check held)", _AUDIT_REPORT),
                    "400": err(
                        "'from' is not a sequence number (invalid_field); a checkpoint "
                        "line that is not one, named by its number, or too many "
                        "(invalid_checkpoints); malformed_json, unknown_field"
                    ),
                    "404": err("this broker does not verify its audit chain (not_found)"),
                    **_ADMIN_ERRS,
                },
            }
        },
    }
