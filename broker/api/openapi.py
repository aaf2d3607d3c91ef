"""The OpenAPI 3.1 description of the HTTP API (served at ``/openapi.json``).

Size: one literal document describing every route; split across modules it would no
longer read as the API it pins (its golden is the review surface)."""

from __future__ import annotations

from typing import Any

from broker import __version__
from broker.api.openapi_listings import listing_paths
from broker.api.openapi_operators import ADMIN_ERRORS, SAID_BODY, operator_paths
from broker.engines import ENGINES

_ERROR = {"$ref": "#/components/schemas/Error"}


def _err(desc: str) -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": _ERROR}}}


def _body(schema: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _ok(desc: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    if schema is None:
        return {"description": desc}
    return {"description": desc, "content": {"application/json": {"schema": schema}}}


_WORKLOAD: list[dict[str, list[str]]] = [{"identityToken": []}]
_ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]
_LEASE_PARAM = {
    "name": "lease_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^l-[0-9a-f]{32}$"},
}
_INSTANCE_PARAM = {
    "name": "instance_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:@-]{0,253}$"},
}
_COMMON = {
    "401": _err("identity token missing or invalid"),
    "503": _err("Vault or the lease store is unavailable"),
}
_ADMIN_ERRS = ADMIN_ERRORS
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


_NAMES = {"type": "array", "maxItems": 1000, "items": {"type": "string"}}
_SELECTION = {
    "type": "object",
    "additionalProperties": False,
    "description": "Same selector repeated: OR; different selectors: AND (claims: same key "
    "OR, different keys AND). role, leases and the issued window select an active instance "
    "holding a live lease that matches them all. At least one selector (empty_selection).",
    "properties": {
        "instances": _NAMES,
        "workloads": _NAMES,
        "issuers": _NAMES,
        "roles": _NAMES,
        "leases": _NAMES,
        "claims": {
            "type": "array",
            "maxItems": 1000,
            "items": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9_.:/@-]{0,127}=.+$"},
        },
        "issued_after": {"type": "string", "format": "date-time"},
        "issued_before": {"type": "string", "format": "date-time"},
    },
}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer"}}


def _bulk_paths() -> dict[str, Any]:
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
                "security": _ADMIN,
                "requestBody": _body(selection_body),
                "responses": {
                    "200": _ok(
                        "the blast radius",
                        {
                            "type": "object",
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
                    "400": _err("bad or empty selection (invalid_selection, empty_selection)"),
                    **_ADMIN_ERRS,
                },
            }
        },
        "/v1/admin/terminations": {
            "post": {
                "summary": "Terminate the next batch of a selection's active instances, one "
                "revocation job each, in one transaction (scope revoke); follow 'next'. "
                "Idempotent; never-seen instance ids are tombstoned and reported",
                "security": _ADMIN,
                "requestBody": _body(
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["selection"],
                        "properties": {
                            "selection": _SELECTION,
                            "reason": {"type": "string", "maxLength": 200},
                            "incident": {"type": "string", "maxLength": 128},
                            "max": {"type": "integer", "minimum": 1},
                            "after": {"type": "string"},
                            "batch": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                    }
                ),
                "responses": {
                    "202": _ok(
                        "the batch: jobs recorded, never-seen ids, the next cursor",
                        {
                            "type": "object",
                            "properties": {
                                "terminated": {"type": "array", "items": {"type": "object"}},
                                "never_seen": _NAMES,
                                "next": {"type": ["string", "null"]},
                                "counts": _COUNTS,
                            },
                        },
                    ),
                    "400": _err(
                        "bad selection or field (invalid_selection, empty_selection, "
                        "reason_required when more than one instance is reached)"
                    ),
                    "409": _err("the selection reaches more than 'max' (selection_too_large)"),
                    **_ADMIN_ERRS,
                },
            }
        },
    }


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "Ephemeral credential broker", "version": __version__},
        "components": {
            "securitySchemes": {
                "identityToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "adminToken": {"type": "http", "scheme": "bearer"},
            },
            "schemas": {
                "AuditEvent": {
                    "type": "object",
                    "description": "one link of the audit chain: hash = SHA-256(tag, "
                    "prev_hash, RFC 8785 JSON of the event without its hashes)",
                    "required": [
                        "seq",
                        "at",
                        "actor",
                        "action",
                        "outcome",
                        "detail",
                        "prev_hash",
                        "hash",
                    ],
                    "properties": {
                        "seq": {"type": "integer"},
                        "at": {"type": "string", "format": "date-time"},
                        "actor": {"type": "string"},
                        "action": {"type": "string"},
                        "instance_id": {"type": ["string", "null"]},
                        "lease_id": {"type": ["string", "null"]},
                        "outcome": {"type": "string"},
                        "reason": {"type": ["string", "null"]},
                        "detail": {"type": "object"},
                        "prev_hash": {"type": "string"},
                        "hash": {"type": "string"},
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        }
                    },
                },
                "CredentialRequest": {
                    "type": "object",
                    "description": (
                        "Besides role and ttl, only the parameters the role lets a caller "
                        "send (e.g. csr for a PKI sign role, public_key for an SSH role); "
                        "any other field is refused with 400 unknown_parameter."
                    ),
                    "additionalProperties": {"type": "string"},
                    "required": ["role"],
                    "properties": {
                        "role": {"type": "string"},
                        "ttl": {"type": ["string", "integer"]},
                    },
                },
                "Credential": {
                    "type": "object",
                    "properties": {
                        "lease_id": {"type": "string"},
                        "instance_id": {"type": "string"},
                        "workload": {"type": "string"},
                        "role": {"type": "string"},
                        "kind": {
                            "type": "string",
                            "enum": sorted({e.kind for e in ENGINES.values()}),
                        },
                        "data": {"type": "object"},
                        "issued_at": {"type": "string", "format": "date-time"},
                        "expires_at": {"type": "string", "format": "date-time"},
                        "renewable": {"type": "boolean"},
                        "leased": {
                            "type": "boolean",
                            "description": "false: no Vault lease (e.g. a kv secret); "
                            "termination cannot take it back",
                        },
                        "lease_limit": {
                            "type": "object",
                            "description": "the role's per-instance lease limit and the "
                            "leases this request replaced under it",
                            "properties": {
                                "max_leases": {"type": "integer"},
                                "on_limit": {"type": "string", "enum": ["revoke_oldest", "refuse"]},
                                "revoked": {"type": "array", "items": {"type": "string"}},
                                "revocation_pending": {
                                    "type": "array",
                                    "items": {"type": "string"},
                                },
                            },
                        },
                    },
                },
                "Renewal": {
                    "type": "object",
                    "properties": {
                        "lease_id": {"type": "string"},
                        "expires_at": {"type": "string", "format": "date-time"},
                        "max_expires_at": {"type": "string", "format": "date-time"},
                        "near_max_ttl": {"type": "boolean"},
                        "renewable": {"type": "boolean"},
                    },
                },
                "PolicyPreview": {
                    "type": "object",
                    "properties": {
                        "issuer": {"type": "string"},
                        "identity": {
                            "type": "object",
                            "properties": {
                                k: {"type": "string"}
                                for k in ("subject", "workload", "instance_id")
                            },
                        },
                        "roles": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "role": {"type": "string"},
                                    "granted": {"type": "boolean"},
                                    "code": {
                                        "type": ["string", "null"],
                                        "description": "what POST /v1/credentials would "
                                        "answer: role_not_permitted, template_value_refused",
                                    },
                                    "reason": {"type": "string"},
                                    "rule": {"type": ["string", "null"]},
                                    "ttl": {"type": ["integer", "null"]},
                                },
                            },
                        },
                    },
                },
                "Job": {
                    "type": "object",
                    "properties": {
                        "job_id": {"type": "string"},
                        "instance_id": {"type": "string"},
                        "state": {
                            "type": "string",
                            "enum": ["pending", "running", "done", "failed"],
                        },
                        "attempts": {"type": "integer"},
                        "last_error": {"type": ["string", "null"]},
                    },
                },
            },
        },
        "paths": {
            "/v1/credentials": {
                "post": {
                    "summary": "Exchange an identity token for a credential",
                    "security": _WORKLOAD,
                    "requestBody": _body({"$ref": "#/components/schemas/CredentialRequest"}),
                    "responses": {
                        "201": _ok(
                            "issued and recorded", {"$ref": "#/components/schemas/Credential"}
                        ),
                        "400": _err("malformed request"),
                        "403": _err("role not permitted for this identity"),
                        "409": _err("instance terminated, or the role's lease limit reached"),
                        "413": _err("request too large"),
                        **_COMMON,
                    },
                }
            },
            "/v1/leases/{lease_id}/renew": {
                "post": {
                    "summary": "Renew one of the caller's own leases",
                    "security": _WORKLOAD,
                    "parameters": [_LEASE_PARAM],
                    "responses": {
                        "200": _ok("renewed", {"$ref": "#/components/schemas/Renewal"}),
                        "400": _err("not renewable / at max TTL"),
                        "404": _err("no such lease for this instance"),
                        "409": _err("instance terminated"),
                        **_COMMON,
                    },
                }
            },
            "/v1/leases/{lease_id}": {
                "delete": {
                    "summary": "Return one of the caller's own leases early",
                    "security": _WORKLOAD,
                    "parameters": [_LEASE_PARAM],
                    "responses": {
                        "204": _ok("revoked in Vault"),
                        "404": _err("no such lease for this instance"),
                        **_COMMON,
                    },
                }
            },
            "/v1/instances/self/terminate": {
                "post": {
                    "summary": "End the caller's own instance, the one its identity token "
                    "names (never one the request names): tombstone and revocation job, as "
                    "the admin terminate; idempotent. Where the token's issuer uses replay "
                    "protection, the call uses up the token's jti",
                    "security": _WORKLOAD,
                    "requestBody": _body(
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "reason": {
                                    "type": "string",
                                    "maxLength": 200,
                                    "description": "printable; kept in the audit event",
                                }
                            },
                        },
                        required=False,
                    ),
                    "responses": {
                        "202": _ok(
                            "revocation job queued (or the one already queued)",
                            {
                                "type": "object",
                                "properties": {
                                    "instance_id": {"type": "string"},
                                    "job": {"$ref": "#/components/schemas/Job"},
                                },
                            },
                        ),
                        "400": _err("malformed body, unknown field or bad reason"),
                        "403": _err("the instance id belongs to another issuer or workload"),
                        "413": _err("request too large"),
                        **_COMMON,
                    },
                }
            },
            "/v1/instances/{instance_id}/terminate": {
                "post": {
                    "summary": "Revoke everything an instance holds and tombstone it "
                    "(idempotent; scope revoke); the reason and incident are recorded",
                    "security": _ADMIN,
                    "parameters": [_INSTANCE_PARAM],
                    "requestBody": SAID_BODY,
                    "responses": {
                        "202": _ok(
                            "revocation job queued; never_seen: the broker never saw the id "
                            "(tombstoned all the same, 0 leases)"
                        ),
                        "400": _err("malformed body"),
                        **_ADMIN_ERRS,
                    },
                }
            },
            "/v1/instances/{instance_id}": {
                "get": {
                    "summary": "An instance's state, leases and revocation job",
                    "security": _ADMIN,
                    "parameters": [_INSTANCE_PARAM],
                    "responses": {
                        "200": _ok("the instance"),
                        "400": _err("bad instance id, or a query parameter (unknown_query)"),
                        "404": _err("unknown instance"),
                        **_ADMIN_ERRS,
                    },
                }
            },
            **listing_paths(),
            "/v1/admin/policy/explain": {
                "post": {
                    "summary": "Why a token would get a role or not; issues and records nothing",
                    "security": _ADMIN,
                    "requestBody": _body(
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["token", "role"],
                            "properties": {
                                "token": {"type": "string"},
                                "role": {"type": "string"},
                                "ttl": {"type": ["string", "integer"]},
                            },
                        }
                    ),
                    "responses": {
                        "200": _ok(
                            "token verdict, identity, the instance's standing, rules "
                            "applying, the policy decision, and 'verdict' (granted or "
                            "refused) with every 'refusals' entry ({code, message, ...}: "
                            "token invalid, role refused, instance_terminated with since "
                            "and by, locked)"
                        ),
                        "400": _err("malformed request"),
                        **_ADMIN_ERRS,
                    },
                }
            },
            "/v1/admin/policy/preview": {
                "post": {
                    "summary": "Whether a token of the named issuer carrying these claims "
                    "would get each role (the injector asks at admission); verifies, "
                    "issues and records nothing",
                    "security": _ADMIN,
                    "requestBody": _body(
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["issuer", "claims", "roles"],
                            "properties": {
                                "issuer": {
                                    "type": "string",
                                    "description": "an issuer's name in the broker's configuration",
                                },
                                "claims": {
                                    "type": "object",
                                    "description": "the claims a token would carry; "
                                    "a missing instance claim maps to an empty "
                                    "instance id",
                                },
                                "roles": {
                                    "type": "array",
                                    "minItems": 1,
                                    "maxItems": 32,
                                    "items": {"type": "string"},
                                },
                                "ttl": {"type": ["string", "integer"]},
                            },
                        }
                    ),
                    "responses": {
                        "200": _ok(
                            "the identity the claims map to, and a verdict per role",
                            {"$ref": "#/components/schemas/PolicyPreview"},
                        ),
                        "400": _err("unknown issuer, claims that do not map, bad roles"),
                        **_ADMIN_ERRS,
                    },
                }
            },
            "/v1/admin/audit/events": {
                "get": {
                    "summary": "Audit events after a sequence number that match every "
                    "selector given, oldest first (read scope); follow ``next`` for more",
                    "security": _ADMIN,
                    "parameters": [
                        {
                            "name": "after",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 0},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": 1000,
                                "default": 100,
                            },
                        },
                        {
                            "name": "newest",
                            "in": "query",
                            "description": "true: the last `limit` events (a tail)",
                            "schema": {"type": "boolean", "default": False},
                        },
                        *(
                            {"name": name, "in": "query", "schema": {"type": "string"}}
                            for name in ("instance", "workload", "role", "action", "actor")
                        ),
                        {
                            "name": "since",
                            "in": "query",
                            "schema": {"type": "string", "format": "date-time"},
                        },
                    ],
                    "responses": {
                        "200": _ok(
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
                        "400": _err(
                            "a bad (invalid_query) or unknown (unknown_query) query parameter"
                        ),
                        **_ADMIN_ERRS,
                    },
                }
            },
            "/v1/admin/jobs/{job_id}/retry": {
                "post": {
                    "summary": "Queue a failed revocation job again (attempts from zero; "
                    "scope admin)",
                    "security": _ADMIN,
                    "requestBody": SAID_BODY,
                    "parameters": [
                        {
                            "name": "job_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "pattern": "^j-[0-9a-f]{32}$"},
                        }
                    ],
                    "responses": {
                        "202": _ok("queued"),
                        "400": _err("the job has not failed (job_not_failed)"),
                        "404": _err("no such job"),
                        **_ADMIN_ERRS,
                    },
                }
            },
            "/v1/admin/audit/verify": {
                "post": {
                    "summary": "Recompute the audit chain from a seq (or its start) to its "
                    "head: every link, checkpoint and signature; findings name their seq",
                    "security": _ADMIN,
                    "requestBody": _body(
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"from": {"type": "integer", "minimum": 1}},
                        },
                        required=False,
                    ),
                    "responses": {
                        "200": _ok("the verification report (ok: every check held)", _AUDIT_REPORT),
                        "400": _err("'from' is not a sequence number"),
                        **_ADMIN_ERRS,
                    },
                }
            },
            **_bulk_paths(),
            "/v1/admin/reconcile": {
                "post": {
                    "summary": "Reconcile the store with Vault now: leases past expiry, "
                    "requests stuck in issuing, orphans under the broker's paths, unseen "
                    "instances",
                    "security": _ADMIN,
                    "requestBody": _body(
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "revoke_orphans": {
                                    "type": "boolean",
                                    "description": "needs scope admin (otherwise revoke)",
                                },
                                "reason": {"type": "string", "maxLength": 200},
                                "incident": {"type": "string", "maxLength": 128},
                            },
                        },
                        required=False,
                    ),
                    "responses": {
                        "200": _ok(
                            "the pass's report (skipped: another replica was reconciling)",
                            {
                                "type": "object",
                                "properties": {
                                    k: {"type": "integer"}
                                    for k in (
                                        "expired",
                                        "expiry_corrected",
                                        "stuck_settled",
                                        "stuck_revoked_in_vault",
                                        "orphans",
                                        "orphans_revoked",
                                    )
                                }
                                | {
                                    k: {"type": "array", "items": {"type": "string"}}
                                    for k in (
                                        "past_expiry_held",
                                        "stuck_waiting",
                                        "orphan_sample",
                                        "unseen_terminated",
                                    )
                                }
                                | {
                                    "skipped": {"type": "boolean"},
                                    "errors": {"type": "object"},
                                    "started_at": {"type": "string", "format": "date-time"},
                                },
                            },
                        ),
                        **_ADMIN_ERRS,
                    },
                }
            },
            "/v1/events/terminate": {
                "post": {
                    "summary": "Terminate instances from an event pipeline, signed with "
                    "X-Broker-Timestamp and X-Broker-Signature: sha256=HMAC(secret, "
                    "'<timestamp>.' + body); each signed request is accepted once",
                    "parameters": [
                        {
                            "name": "X-Broker-Timestamp",
                            "in": "header",
                            "required": True,
                            "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"},
                        },
                        {
                            "name": "X-Broker-Signature",
                            "in": "header",
                            "required": True,
                            "schema": {"type": "string", "pattern": "^sha256=[0-9a-f]{64}$"},
                        },
                    ],
                    "requestBody": _body(
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["instance_ids"],
                            "properties": {
                                "instance_ids": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {"type": "string"},
                                },
                                "issuer": {"type": "string"},
                                "reason": {"type": "string", "maxLength": 200},
                            },
                        }
                    ),
                    "responses": {
                        "202": _ok("a revocation job (or a refusal) per instance"),
                        "400": _err("malformed body"),
                        "401": _err(
                            "signature missing or wrong, timestamp outside the window, "
                            "or the request was already accepted"
                        ),
                        "404": _err("the webhook is not configured"),
                        "503": _err("the store is unavailable; send the same request again"),
                    },
                }
            },
            **operator_paths(),
            "/healthz": {"get": {"summary": "Process is up", "responses": {"200": _ok("up")}}},
            "/readyz": {
                "get": {
                    "summary": "Store and Vault reachable, Vault unsealed",
                    "responses": {"200": _ok("ready"), "503": _err("not ready")},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": _ok("text exposition format")},
                }
            },
        },
    }
