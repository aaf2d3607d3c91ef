"""The OpenAPI description of the admin listings: leases (listed, counted, shown, and a
lost one marked resolved), instances and revocation jobs. Merged into
``openapi_document``'s paths.

Every admin GET refuses a query parameter it does not take (400 ``unknown_query``) and a
repeated one (400 ``invalid_query``); a listing answers a page and ``next``, the cursor
of the following page, null when there is no more.
"""

from __future__ import annotations

from typing import Any

from broker.api.decode import MAX_REASON, PRINTABLE_CLASS
from broker.api.openapi_operators import ADMIN_ERRORS
from broker.api.openapi_parts import (
    ADMIN,
    INCIDENT,
    LEASE_ID,
    NULL_TIME,
    TIME,
    body,
    err,
    ok,
    or_empty,
)
from broker.api.queries import MAX_VALUE, TEXT_PATTERN
from broker.leases import LIVE_LEASE_STATES, InstanceState, JobState, LeaseState

_BAD_QUERY = (
    "unknown query parameter (unknown_query, naming the ones the endpoint takes), "
    "a repeated or invalid one (invalid_query)"
)
_LEASE_STATES = sorted(s.value for s in LeaseState)
_TIME = TIME
_NULL_TIME = NULL_TIME


def _q(name: str, desc: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "description": desc,
        "schema": schema or {"type": "string", "maxLength": MAX_VALUE, "pattern": TEXT_PATTERN},
    }


_LIMIT = _q(
    "limit", "page size (default 100)", or_empty({"type": "integer", "minimum": 1, "maximum": 1000})
)
_AFTER = _q(
    "after",
    "the 'next' of the page before (an opaque cursor; one the broker did not give out is "
    "refused: invalid_query)",
    {"type": "string", "pattern": "^[A-Za-z0-9_-]{0,255}$"},
)
_SINCE = _q(
    "since",
    "created at or after this time (ISO 8601; without a zone, UTC; empty: as if absent)",
    {"type": "string", "anyOf": [{"format": "date-time"}, {"maxLength": 0}]},
)
_ERRS = {"400": err(_BAD_QUERY), **ADMIN_ERRORS}


def _choice(values: Any) -> dict[str, Any]:
    """A query parameter taking one of ``values``; empty is as if it were absent."""
    return {"type": "string", "enum": [*sorted(values), ""]}


def _page(key: str, item: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": [key, "next"],
        "properties": {
            key: {"type": "array", "items": item},
            "next": {
                "type": ["string", "null"],
                "description": "pass as 'after' for the next page; null: nothing more",
            },
        },
    }


_LEASE: dict[str, Any] = {
    "type": "object",
    "required": [
        "lease_id",
        "instance_id",
        "workload",
        "role",
        "kind",
        "state",
        "renewable",
        "created_at",
        "issued_at",
        "expires_at",
        "ended_at",
        "vault_lease_id",
        "resolution",
    ],
    "properties": {
        "lease_id": {"type": "string"},
        "instance_id": {"type": "string"},
        "workload": {"type": "string"},
        "role": {"type": "string"},
        "kind": {"type": "string"},
        "state": {"type": "string", "enum": _LEASE_STATES},
        "renewable": {"type": "boolean"},
        "created_at": _TIME,
        "issued_at": _NULL_TIME,
        "expires_at": _NULL_TIME,
        "ended_at": _NULL_TIME,
        "vault_lease_id": {"type": ["string", "null"]},
        "resolution": {
            "type": ["object", "null"],
            "description": "a lost lease an operator marked resolved (state resolved): "
            "when, by whom, why and the incident; null otherwise",
            "required": ["at", "by", "reason", "incident"],
            "properties": {
                "at": _TIME,
                "by": {"type": "string"},
                "reason": {"type": "string"},
                "incident": {"type": ["string", "null"]},
            },
        },
    },
}
LEASE = _LEASE
# ``resolve``'s reason: printable (``decode.reason``) and not blank.
_NOT_BLANK = f"^[^{PRINTABLE_CLASS}]*[^{PRINTABLE_CLASS} ][^{PRINTABLE_CLASS}]*$"
_INSTANCE = {
    "type": "object",
    "required": ["instance_id", "state", "created_at", "terminated_at", "leases", "live_leases"],
    "properties": {
        "instance_id": {"type": "string"},
        "state": {"type": "string", "enum": sorted(s.value for s in InstanceState)},
        "issuer_name": {"type": ["string", "null"]},
        "workload": {"type": ["string", "null"]},
        "created_at": _TIME,
        "terminated_at": _NULL_TIME,
        "leases": {
            "type": "object",
            "description": "the instance's leases counted by state",
            "additionalProperties": {"type": "integer"},
        },
        "live_leases": {"type": "integer", "description": "issuing, active or revoking"},
    },
}
_VAULT = {
    "type": "object",
    "description": "what Vault's sys/leases/lookup says now (times, never a secret); or "
    "'error': lease_unknown (Vault does not know it), no_vault_lease (a credential "
    "without one), or the code of Vault's failure (vault_unavailable...)",
    "properties": {
        "lease_id": {"type": "string"},
        "issue_time": _NULL_TIME,
        "expire_time": _NULL_TIME,
        "ttl": {"type": ["integer", "null"], "description": "seconds left"},
        "renewable": {"type": "boolean"},
        "error": {"type": "string"},
    },
}


def listing_paths() -> dict[str, Any]:
    return {
        "/v1/admin/leases": {
            "get": {
                "summary": "Leases, filtered, a page at a time (ordered by lease id)",
                "security": ADMIN,
                "parameters": [
                    _q("instance", "an instance id"),
                    _q("workload", "a workload name"),
                    _q("role", "a role name"),
                    _q("state", "a lease state", _choice(_LEASE_STATES)),
                    _LIMIT,
                    _q(
                        "after",
                        "the 'next' of the page before (a lease id; empty: as if absent)",
                        {"type": "string", "pattern": "^(l-[0-9a-f]{32})?$"},
                    ),
                ],
                "responses": {"200": ok("a page of leases", _page("leases", _LEASE)), **_ERRS},
            }
        },
        "/v1/admin/leases/count": {
            "get": {
                "summary": "Leases counted by role, engine (the role's kind), workload or "
                "issuer (the instance's), largest first: a lease explosion at a glance",
                "security": ADMIN,
                "parameters": [
                    {
                        **_q("group_by", "what to count by"),
                        "required": True,
                        "schema": {
                            "type": "string",
                            "enum": ["engine", "issuer", "role", "workload"],
                        },
                    },
                    _q(
                        "state",
                        "count leases in this state (default: the live states, "
                        + ", ".join(sorted(s.value for s in LIVE_LEASE_STATES))
                        + ")",
                        _choice(_LEASE_STATES),
                    ),
                    _q(
                        "top",
                        "the N largest groups (default 20)",
                        or_empty({"type": "integer", "minimum": 1, "maximum": 1000}),
                    ),
                ],
                "responses": {
                    "200": ok(
                        "the largest groups; total, group_count and others (leases in "
                        "the groups 'top' left out) cover every group",
                        {
                            "type": "object",
                            "required": [
                                "group_by",
                                "states",
                                "groups",
                                "total",
                                "group_count",
                                "others",
                            ],
                            "properties": {
                                "group_by": {"type": "string"},
                                "states": {"type": "array", "items": {"type": "string"}},
                                "groups": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "properties": {
                                            "key": {"type": ["string", "null"]},
                                            "count": {"type": "integer"},
                                        },
                                    },
                                },
                                "total": {"type": "integer"},
                                "group_count": {"type": "integer"},
                                "others": {"type": "integer"},
                            },
                        },
                    ),
                    **_ERRS,
                },
            }
        },
        "/v1/admin/leases/{lease_id}": {
            "get": {
                "summary": "One lease as the store holds it; with vault=true, also what "
                "Vault says of it now",
                "security": ADMIN,
                "parameters": [
                    {
                        "name": "lease_id",
                        "in": "path",
                        "required": True,
                        "schema": LEASE_ID,
                    },
                    _q("vault", "ask Vault too", _choice(["false", "true"])),
                ],
                "responses": {
                    "200": ok(
                        "the lease (and 'vault' when asked)",
                        {**_LEASE, "properties": {**_LEASE["properties"], "vault": _VAULT}},
                    ),
                    "404": err("no such lease"),
                    **_ERRS,
                },
            }
        },
        "/v1/admin/leases/{lease_id}/resolve": {
            "post": {
                "summary": "Mark a lost lease resolved once its credential was ended by hand: "
                "who, when, why and the incident are recorded on it and audited "
                "(lease.resolved); it is then no longer listed, counted or reported as lost. "
                "Idempotent: a lease resolved before is answered as it is (changed false). "
                "Scope revoke",
                "security": ADMIN,
                "parameters": [
                    {"name": "lease_id", "in": "path", "required": True, "schema": LEASE_ID}
                ],
                "requestBody": body(
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["reason"],
                        "properties": {
                            "reason": {
                                "type": "string",
                                "minLength": 1,
                                "maxLength": MAX_REASON,
                                "pattern": _NOT_BLANK,
                                "description": "how the credential was ended (printable, "
                                "not blank); kept on the lease and in the audit event",
                            },
                            "incident": INCIDENT,
                        },
                    }
                ),
                "responses": {
                    "200": ok(
                        "the lease, resolved; changed: whether this call marked it",
                        {
                            "type": "object",
                            "required": ["lease", "changed"],
                            "properties": {"lease": _LEASE, "changed": {"type": "boolean"}},
                        },
                    ),
                    "400": err(
                        "reason missing or blank, or not printable text of at most "
                        f"{MAX_REASON} characters (invalid_reason); invalid_incident, "
                        "malformed_json, unknown_field"
                    ),
                    "404": err("no such lease (lease_not_found)"),
                    "409": err(
                        "the lease is neither lost nor resolved (lease_not_lost): a live one "
                        "is ended by revoking its instance"
                    ),
                    **ADMIN_ERRORS,
                },
            }
        },
        "/v1/admin/instances": {
            "get": {
                "summary": "Instances in the order the broker first saw them, with their "
                "lease counts, a page at a time",
                "security": ADMIN,
                "parameters": [
                    _q(
                        "state",
                        "an instance state",
                        _choice(s.value for s in InstanceState),
                    ),
                    _q("workload", "a workload name"),
                    _q("issuer", "an issuer's name"),
                    _SINCE,
                    _LIMIT,
                    _AFTER,
                ],
                "responses": {
                    "200": ok("a page of instances", _page("instances", _INSTANCE)),
                    **_ERRS,
                },
            }
        },
        "/v1/admin/jobs": {
            "get": {
                "summary": "Revocation jobs in the order they were requested (created_at, "
                "then job id), a page at a time",
                "security": ADMIN,
                "parameters": [
                    _q(
                        "state",
                        "a job state",
                        _choice(s.value for s in JobState),
                    ),
                    _q("instance", "an instance id"),
                    _SINCE,
                    _LIMIT,
                    _AFTER,
                ],
                "responses": {
                    "200": ok(
                        "a page of jobs", _page("jobs", {"$ref": "#/components/schemas/Job"})
                    ),
                    **_ERRS,
                },
            }
        },
    }
