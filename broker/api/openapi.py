"""The OpenAPI 3.1 description of the HTTP API (served at ``/openapi.json``).
The admin listings, operators and locks, the audit and bulk termination describe their
routes in modules of their own (``openapi_<part>``), over the helpers of
``openapi_parts``."""

from __future__ import annotations

from typing import Any

from broker import __version__
from broker.api.openapi_audit import audit_paths
from broker.api.openapi_bulk import bulk_paths
from broker.api.openapi_components import SCHEMAS
from broker.api.openapi_listings import LEASE, listing_paths
from broker.api.openapi_operators import ADMIN_ERRORS, SAID_BODY, operator_paths
from broker.api.openapi_parts import (
    ADMIN,
    INCIDENT,
    JOB_ID,
    LEASE_ID,
    NULL_TIME,
    REASON,
    ROLE,
    TIME,
    TTL,
    VAULT_ERRORS,
    body,
    err,
    obj,
    ok,
    with_refusals_before_routing,
)
from broker.api.openapi_token import LEASE_LINKS, token_paths
from broker.leases import InstanceState

_WORKLOAD: list[dict[str, list[str]]] = [{"identityToken": []}]
_NO_STORE = {
    "Cache-Control": {"schema": {"type": "string", "enum": ["no-store"]}, "required": True}
}
_LEASE_PARAM = {"name": "lease_id", "in": "path", "required": True, "schema": LEASE_ID}
_INSTANCE_PARAM = {
    "name": "instance_id",
    "in": "path",
    "required": True,
    "description": "1-254 of [A-Za-z0-9._:@/-], starting with a letter or digit, with no "
    "'.' or '..' segment; percent-encode '/' (anything else: 400 invalid_instance_id)",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:@-]{0,253}$"},
}
_COMMON = {
    "401": err("identity token missing or invalid (token_*)"),
    **VAULT_ERRORS,
}
_ADMIN_ERRS = ADMIN_ERRORS
_JOB_REF = {"$ref": "#/components/schemas/Job"}


def openapi_document() -> dict[str, Any]:
    document = _described()
    with_refusals_before_routing(document["paths"])
    return document


def _described() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Ephemeral credential broker",
            "version": __version__,
            "description": "Every refusal is JSON: {error: {code, message}} (POST /v1/token: "
            "the OAuth shape). A method a path does not take is answered 405 "
            "method_not_allowed with an Allow header naming the ones it does.",
        },
        "components": {
            "securitySchemes": {
                "identityToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "adminToken": {"type": "http", "scheme": "bearer"},
            },
            "schemas": SCHEMAS,
        },
        "paths": {
            "/v1/credentials": {
                "post": {
                    "summary": "Exchange an identity token for a credential",
                    "operationId": "createCredential",
                    "security": _WORKLOAD,
                    "requestBody": body({"$ref": "#/components/schemas/CredentialRequest"}),
                    "responses": {
                        "201": {
                            **ok(
                                "issued and recorded", {"$ref": "#/components/schemas/Credential"}
                            ),
                            "headers": _NO_STORE,
                            "links": LEASE_LINKS,
                        },
                        "400": err(
                            "malformed_json, invalid_role, invalid_ttl, unknown_parameter, "
                            "missing_parameter, invalid_parameter"
                        ),
                        "403": err(
                            "role not permitted for this identity (role_not_permitted, "
                            "template_value_refused, locked, instance_*_mismatch)"
                        ),
                        "409": err(
                            "instance terminated (instance_terminated), or the role's lease "
                            "limit reached (lease_limit_reached)"
                        ),
                        **_COMMON,
                    },
                }
            },
            "/v1/leases/{lease_id}/renew": {
                "post": {
                    "summary": "Renew one of the caller's own leases",
                    "operationId": "renewLease",
                    "security": _WORKLOAD,
                    "parameters": [_LEASE_PARAM],
                    "requestBody": body(
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"ttl": TTL},
                        },
                        required=False,
                    ),
                    "responses": {
                        "200": ok("renewed", {"$ref": "#/components/schemas/Renewal"}),
                        "400": err(
                            "not renewable (lease_not_renewable, lease_not_active), at max TTL "
                            "(lease_at_max_ttl); malformed_json, unknown_field, invalid_ttl"
                        ),
                        "403": err("a lock matches the lease (locked)"),
                        "404": err("no such lease for this instance (lease_not_found)"),
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
                    "operationId": "releaseLease",
                    "security": _WORKLOAD,
                    "parameters": [_LEASE_PARAM],
                    "responses": {
                        "204": ok(
                            "revoked in Vault; or already ended (a lease Vault no longer "
                            "knew is recorded expired or lost, for the operator)"
                        ),
                        "404": err("no such lease for this instance (lease_not_found)"),
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
                            "properties": {"reason": REASON},
                        },
                        required=False,
                    ),
                    "responses": {
                        "202": ok(
                            "revocation job queued (or the one already queued)",
                            obj({"instance_id": {"type": "string"}, "job": _JOB_REF}),
                        ),
                        "400": err("malformed_json, unknown_field, invalid_reason"),
                        "403": err(
                            "the instance id belongs to another issuer or workload "
                            "(instance_issuer_mismatch, instance_workload_mismatch)"
                        ),
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
                            "(tombstoned all the same, 0 leases)",
                            obj(
                                {
                                    "instance_id": {"type": "string"},
                                    "job": _JOB_REF,
                                    "never_seen": {"type": "boolean"},
                                }
                            ),
                        ),
                        "400": err(
                            "invalid_instance_id, malformed_json, unknown_field, "
                            "invalid_reason, invalid_incident"
                        ),
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
                        "200": ok(
                            "the instance",
                            obj(
                                {
                                    "instance_id": {"type": "string"},
                                    "state": {
                                        "type": "string",
                                        "enum": sorted(s.value for s in InstanceState),
                                    },
                                    "issuer_name": {"type": ["string", "null"]},
                                    "workload": {"type": ["string", "null"]},
                                    "created_at": TIME,
                                    "terminated_at": NULL_TIME,
                                    "leases": {"type": "array", "items": LEASE},
                                    "job": {"oneOf": [_JOB_REF, {"type": "null"}]},
                                }
                            ),
                        ),
                        "400": err(
                            "a bad instance id (invalid_instance_id), or a query parameter "
                            "(it takes none: unknown_query)"
                        ),
                        "404": err("unknown instance (instance_not_found)"),
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
                                "token": {"type": "string", "minLength": 1},
                                "role": ROLE,
                                "ttl": TTL,
                            },
                        }
                    ),
                    "responses": {
                        "200": ok(
                            "token verdict, identity, the instance's standing, rules "
                            "applying, the policy decision, and 'verdict' (granted or "
                            "refused) with every 'refusals' entry ({code, message, ...}: "
                            "token invalid, role refused, instance_terminated with since "
                            "and by, locked)",
                            {
                                "type": "object",
                                "required": ["verdict", "refusals"],
                                "properties": {
                                    "verdict": {"type": "string", "enum": ["granted", "refused"]},
                                    "refusals": {
                                        "type": "array",
                                        "items": obj(
                                            {
                                                "code": {"type": "string"},
                                                "message": {"type": "string"},
                                            }
                                        ),
                                    },
                                },
                            },
                        ),
                        "400": err(
                            "malformed_json, unknown_field, invalid_token_field, "
                            "invalid_role, invalid_ttl"
                        ),
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
                                    "minLength": 1,
                                    "description": "an issuer's name in the broker's "
                                    "configuration (another: 400 invalid_issuer)",
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
                                    "items": ROLE,
                                },
                                "ttl": TTL,
                            },
                        }
                    ),
                    "responses": {
                        "200": ok(
                            "the identity the claims map to, and a verdict per role",
                            {"$ref": "#/components/schemas/PolicyPreview"},
                        ),
                        "400": err(
                            "an issuer not configured (invalid_issuer), claims the issuer's "
                            "mapping refuses (invalid_claims), bad roles (invalid_role), "
                            "invalid_ttl, malformed_json, unknown_field"
                        ),
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
                        {"name": "job_id", "in": "path", "required": True, "schema": JOB_ID}
                    ],
                    "responses": {
                        "202": ok("queued", obj({"job": _JOB_REF})),
                        "400": err(
                            "the job has not failed (job_not_failed); malformed_json, "
                            "unknown_field, invalid_reason, invalid_incident"
                        ),
                        "404": err("no such job (job_not_found)"),
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
                                    "type": ["boolean", "null"],
                                    "description": "needs scope admin (otherwise revoke)",
                                },
                                "reason": REASON,
                                "incident": INCIDENT,
                            },
                        },
                        required=False,
                    ),
                    "responses": {
                        "200": ok(
                            "the pass's report (skipped: another replica was reconciling)",
                            {
                                "type": "object",
                                "required": [
                                    "started_at",
                                    "skipped",
                                    "expired",
                                    "orphans",
                                    "lost",
                                    "errors",
                                ],
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
                                        "irrevocable",
                                        "unseen_terminated",
                                        "lost",
                                    )
                                }
                                | {
                                    "skipped": {"type": "boolean"},
                                    "errors": {"type": "object"},
                                    "started_at": TIME,
                                },
                            },
                        ),
                        "400": err(
                            "malformed_json, unknown_field, invalid_field (revoke_orphans), "
                            "invalid_reason, invalid_incident"
                        ),
                        **VAULT_ERRORS,
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
                                    "maxItems": 1000,
                                    "description": "at most events.webhook.max_instances "
                                    "(default 100; more: 400 invalid_instance_ids)",
                                    "items": _INSTANCE_PARAM["schema"],
                                },
                                "issuer": {"type": ["string", "null"], "pattern": ROLE["pattern"]},
                                "reason": {
                                    "type": ["string", "null"],
                                    "maxLength": 200,
                                    "pattern": "^[^\\u0000]*$",
                                },
                            },
                        }
                    ),
                    "responses": {
                        "202": ok(
                            "a revocation job (or a refusal) per instance",
                            obj(
                                {
                                    "results": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "required": ["instance_id"],
                                            "properties": {
                                                "instance_id": {"type": "string"},
                                                "job": _JOB_REF,
                                                "error": obj({"code": {"type": "string"}}),
                                            },
                                        },
                                    }
                                }
                            ),
                        ),
                        "400": err(
                            "malformed_json, unknown_field, invalid_instance_ids, "
                            "invalid_instance_id, invalid_issuer, invalid_reason"
                        ),
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
            "/healthz": {
                "get": {
                    "summary": "Process is up",
                    "responses": {
                        "200": ok("up", obj({"status": {"type": "string", "enum": ["ok"]}}))
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Store and Vault reachable, Vault unsealed",
                    "responses": {
                        "200": ok(
                            "ready",
                            obj(
                                {
                                    "status": {"type": "string", "enum": ["ready"]},
                                    "checks": {
                                        "type": "object",
                                        "additionalProperties": {"type": "string"},
                                    },
                                }
                            ),
                        ),
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
                    "responses": {
                        "200": {
                            "description": "text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": ok("the OpenAPI document", {"type": "object"})},
                }
            },
            **token_paths(),
        },
    }
