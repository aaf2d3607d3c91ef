"""The OpenAPI paths of bulk termination: a selection's blast radius and its termination
in batches (``broker.api.openapi`` puts them in)."""

from __future__ import annotations

from typing import Any

from broker.api.decode import PRINTABLE_CLASS
from broker.api.openapi_operators import ADMIN_ERRORS
from broker.api.openapi_parts import ADMIN, INCIDENT, LEASE_ID, REASON, ROLE, body, err, ok

_ADMIN_ERRS = ADMIN_ERRORS

_NAMES = {"type": "array", "maxItems": 1000, "items": {"type": "string"}}


def _list(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": ["array", "null"], "maxItems": 1000, "items": item}


_NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,253}$"}
_NULL_TIME = {"type": ["string", "null"], "format": "date-time"}
_SELECTION = {
    "type": "object",
    "additionalProperties": False,
    "description": "Same selector repeated: OR; different selectors: AND (claims: same key "
    "OR, different keys AND). role, leases and the issued window select an active instance "
    "holding a live lease that matches them all. At least one selector (empty_selection).",
    "properties": {
        "instances": _list({"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:@-]{0,253}$"}),
        "workloads": _list(_NAME),
        "issuers": _list({"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"}),
        "roles": _list(ROLE),
        "leases": _list(LEASE_ID),
        "claims": _list(
            {
                "type": "string",
                "pattern": "^[A-Za-z0-9_][A-Za-z0-9_.:/@-]{0,127}="
                + f"[^{PRINTABLE_CLASS}]{{1,255}}$",
            }
        ),
        "issued_after": _NULL_TIME,
        "issued_before": _NULL_TIME,
    },
}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer"}}


def bulk_paths() -> dict[str, Any]:
    """The selection's blast radius and its bulk termination (``broker.api.selection``)."""
    selection_body = {
        "type": "object",
        "additionalProperties": False,
        "required": ["selection"],
        "properties": {"selection": _SELECTION},
    }
    return {
        "/v1/admin/selection": {
            "post": {
                "summary": "The blast radius of a selection: instances, live leases by role, "
                "engine and kind, workloads, issuers, never-seen ids, and the progress of its "
                "revocation. Changes nothing (scope read)",
                "security": ADMIN,
                "requestBody": body(selection_body),
                "responses": {
                    "200": ok(
                        "the blast radius",
                        {
                            "type": "object",
                            "required": [
                                "instances",
                                "already_terminated",
                                "never_seen",
                                "leases",
                                "workloads",
                                "issuers",
                                "sample",
                                "progress",
                            ],
                            "properties": {
                                "instances": {"type": "integer"},
                                "already_terminated": {"type": "integer"},
                                "never_seen": _NAMES,
                                "leases": {"type": "object"},
                                "workloads": {"type": "object"},
                                "issuers": _COUNTS,
                                "sample": _NAMES,
                                "progress": {"type": "object"},
                            },
                        },
                    ),
                    "400": err("bad or empty selection (invalid_selection, empty_selection)"),
                    **_ADMIN_ERRS,
                },
            }
        },
        "/v1/admin/terminations": {
            "post": {
                "summary": "Terminate the next batch of a selection's active instances, one "
                "revocation job each, in one transaction (scope revoke); follow 'next'. "
                "Idempotent; never-seen instance ids are tombstoned and reported",
                "security": ADMIN,
                "requestBody": body(
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["selection"],
                        "properties": {
                            "selection": _SELECTION,
                            "reason": REASON,
                            "incident": INCIDENT,
                            "max": {"type": ["integer", "null"], "minimum": 1},
                            "after": {
                                "type": ["string", "null"],
                                "pattern": "^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,253}$",
                                "description": "the 'next' of the batch before",
                            },
                            "batch": {"type": ["integer", "null"], "minimum": 1, "maximum": 1000},
                        },
                    }
                ),
                "responses": {
                    "202": ok(
                        "the batch: jobs recorded, never-seen ids, the next cursor",
                        {
                            "type": "object",
                            "required": ["terminated", "never_seen", "next", "counts"],
                            "properties": {
                                "terminated": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["instance_id", "job_id", "leases"],
                                        "properties": {
                                            "instance_id": {"type": "string"},
                                            "job_id": {"type": "string"},
                                            "leases": {"type": "integer"},
                                        },
                                    },
                                },
                                "never_seen": _NAMES,
                                "next": {"type": ["string", "null"]},
                                "counts": _COUNTS,
                            },
                        },
                    ),
                    "400": err(
                        "bad selection or field (invalid_selection, empty_selection, "
                        "reason_required when more than one instance is reached)"
                    ),
                    "409": err("the selection reaches more than 'max' (selection_too_large)"),
                    **_ADMIN_ERRS,
                },
            }
        },
    }
