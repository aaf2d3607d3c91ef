"""The OpenAPI 3.1 description of the HTTP API (served at ``/openapi.json``).
The admin listings, operators and locks, the audit and bulk termination describe their
routes in modules of their own (``openapi_<part>``), over the helpers of
``openapi_parts``."""

from __future__ import annotations

from typing import Any

from broker import __version__
from broker.api.openapi_audit import audit_paths
from broker.api.openapi_bulk import bulk_paths
from broker.api.openapi_listings import listing_paths
from broker.api.openapi_operators import ADMIN_ERRORS, SAID_BODY, operator_paths
from broker.api.openapi_parts import ADMIN, body, err, ok, with_refusals_before_routing
from broker.engines import ENGINES

_WORKLOAD: list[dict[str, list[str]]] = [{"identityToken": []}]
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
    "401": err("identity token missing or invalid"),
    "503": err("Vault or the lease store is unavailable"),
}
_ADMIN_ERRS = ADMIN_ERRORS


def openapi_document() -> dict[str, Any]:
    document = _described()
    with_refusals_before_routing(document["paths"])
    return document


def _described() -> dict[str, Any]:
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
                                "lost": {
                                    "type": "array",
                                    "items": {"type": "string"},
                                    "description": "replaced leases Vault had forgotten "
                                    "before their expiry, recorded lost (only when any)",
                                },
                                "expired": {
                                    "type": "array",
                                    "items": {"type": "string"},
                                    "description": "replaced leases Vault no longer knew "
                                    "past their expiry, recorded expired (only when any)",
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
                    "requestBody": body({"$ref": "#/components/schemas/CredentialRequest"}),
                    "responses": {
                        "201": ok(
                            "issued and recorded", {"$ref": "#/components/schemas/Credential"}
                        ),
                        "400": err("malformed request"),
                        "403": err("role not permitted for this identity"),
                        "409": err("instance terminated, or the role's lease limit reached"),
                        "413": err("request too large"),
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
                        "200": ok("renewed", {"$ref": "#/components/schemas/Renewal"}),
                        "400": err("not renewable / at max TTL"),
                        "404": err("no such lease for this instance"),
                        "409": err(
                            "instance terminated (instance_terminated), or Vault no longer "
                            "knows the lease: lease_expired, or lease_lost (Vault forgot it "
                            "before its expiry); on either, request a new credential"
                        ),
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
                        "204": ok(
                            "revoked in Vault; or already ended (a lease Vault no longer "
                            "knew is recorded expired or lost, for the operator)"
                        ),
                        "404": err("no such lease for this instance"),
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
                    "requestBody": body(
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
                        "202": ok(
                            "revocation job queued (or the one already queued)",
                            {
                                "type": "object",
                                "properties": {
                                    "instance_id": {"type": "string"},
                                    "job": {"$ref": "#/components/schemas/Job"},
                                },
                            },
                        ),
                        "400": err("malformed body, unknown field or bad reason"),
                        "403": err("the instance id belongs to another issuer or workload"),
                        "413": err("request too large"),
                        **_COMMON,
                    },
                }
            },
            "/v1/instances/{instance_id}/terminate": {
                "post": {
                    "summary": "Revoke everything an instance holds and tombstone it "
                    "(idempotent; scope revoke); the reason and incident are recorded",
                    "security": ADMIN,
                    "parameters": [_INSTANCE_PARAM],
                    "requestBody": SAID_BODY,
                    "responses": {
                        "202": ok(
                            "revocation job queued; never_seen: the broker never saw the id "
                            "(tombstoned all the same, 0 leases)"
                        ),
                        "400": err("malformed body"),
                        **_ADMIN_ERRS,
                    },
                }
            },
            "/v1/instances/{instance_id}": {
                "get": {
                    "summary": "An instance's state, leases and revocation job",
                    "security": ADMIN,
                    "parameters": [_INSTANCE_PARAM],
                    "responses": {
                        "200": ok("the instance"),
                        "400": err("bad instance id, or a query parameter (unknown_query)"),
                        "404": err("unknown instance"),
                        **_ADMIN_ERRS,
                    },
                }
            },
            **listing_paths(),
            "/v1/admin/policy/explain": {
                "post": {
                    "summary": "Why a token would get a role or not; issues and records nothing",
                    "security": ADMIN,
                    "requestBody": body(
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
                        "200": ok(
                            "token verdict, identity, the instance's standing, rules "
                            "applying, the policy decision, and 'verdict' (granted or "
                            "refused) with every 'refusals' entry ({code, message, ...}: "
                            "token invalid, role refused, instance_terminated with since "
                            "and by, locked)"
                        ),
                        "400": err("malformed request"),
                        **_ADMIN_ERRS,
                    },
                }
            },
            "/v1/admin/policy/preview": {
                "post": {
                    "summary": "Whether a token of the named issuer carrying these claims "
                    "would get each role (the injector asks at admission); verifies, "
                    "issues and records nothing",
                    "security": ADMIN,
                    "requestBody": body(
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
                        "200": ok(
                            "the identity the claims map to, and a verdict per role",
                            {"$ref": "#/components/schemas/PolicyPreview"},
                        ),
                        "400": err("unknown issuer, claims that do not map, bad roles"),
                        **_ADMIN_ERRS,
                    },
                }
            },
            **audit_paths(),
            "/v1/admin/jobs/{job_id}/retry": {
                "post": {
                    "summary": "Queue a failed revocation job again (attempts from zero; "
                    "scope admin)",
                    "security": ADMIN,
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
                        "202": ok("queued"),
                        "400": err("the job has not failed (job_not_failed)"),
                        "404": err("no such job"),
                        **_ADMIN_ERRS,
                    },
                }
            },
            **bulk_paths(),
            "/v1/admin/reconcile": {
                "post": {
                    "summary": "Reconcile the store with Vault now: leases past expiry, "
                    "requests stuck in issuing, orphans under the broker's paths, unseen "
                    "instances",
                    "security": ADMIN,
                    "requestBody": body(
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
                        "200": ok(
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
                                        "lost",
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
                    "requestBody": body(
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
                        "202": ok("a revocation job (or a refusal) per instance"),
                        "400": err("malformed body"),
                        "401": err(
                            "signature missing or wrong, timestamp outside the window, "
                            "or the request was already accepted"
                        ),
                        "404": err("the webhook is not configured"),
                        "503": err("the store is unavailable; send the same request again"),
                    },
                }
            },
            **operator_paths(),
            "/healthz": {"get": {"summary": "Process is up", "responses": {"200": ok("up")}}},
            "/readyz": {
                "get": {
                    "summary": "Store and Vault reachable, Vault unsealed",
                    "responses": {
                        "200": ok("ready"),
                        "503": err(
                            "not ready (not_ready), or Vault no longer accepts the broker's "
                            "own token (vault_token_invalid: expired or revoked; every "
                            "exchange would fail with 502 until it is replaced)"
                        ),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": ok("text exposition format")},
                }
            },
        },
    }
