"""The reusable schemas of the OpenAPI document (``components.schemas``): the audit
event, the error, a credential request and answer, a renewal, a policy preview, a job,
and the token exchange's (``broker.api.openapi_token``)."""

from __future__ import annotations

from typing import Any

from broker.api.openapi_parts import JOB_ID, LEASE_ID, NULL_TIME, ROLE, TIME, TTL, obj
from broker.api.openapi_token import TOKEN_SCHEMAS
from broker.engines import ENGINES
from broker.leases import JobState

_JOB = obj(
    {
        "job_id": JOB_ID,
        "instance_id": {"type": "string"},
        "state": {"type": "string", "enum": sorted(s.value for s in JobState)},
        "attempts": {"type": "integer", "minimum": 0},
        "next_attempt_at": TIME,
        "last_error": {"type": ["string", "null"]},
        "requested_by": {"type": "string"},
        "created_at": TIME,
        "completed_at": NULL_TIME,
        "reason": {"type": ["string", "null"]},
        "incident": {"type": ["string", "null"]},
    }
)

SCHEMAS: dict[str, Any] = {
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
            "any other field is refused with 400 unknown_parameter, once the "
            "role is known to be permitted (403 role_not_permitted first)."
        ),
        "additionalProperties": {"type": "string"},
        "required": ["role"],
        "properties": {"role": ROLE, "ttl": TTL},
    },
    **TOKEN_SCHEMAS,
    "Credential": {
        "type": "object",
        "required": [
            "lease_id",
            "instance_id",
            "workload",
            "role",
            "kind",
            "data",
            "issued_at",
            "expires_at",
            "renewable",
            "leased",
        ],
        "properties": {
            "lease_id": LEASE_ID,
            "instance_id": {"type": "string"},
            "workload": {"type": "string"},
            "role": {"type": "string"},
            "kind": {
                "type": "string",
                "enum": sorted({e.kind for e in ENGINES.values()}),
            },
            "data": {
                "type": "object",
                "description": "the credential itself, by kind (never logged)",
            },
            "issued_at": TIME,
            "expires_at": TIME,
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
        "required": ["lease_id", "expires_at", "renewable"],
        "properties": {
            "lease_id": LEASE_ID,
            "expires_at": TIME,
            "max_expires_at": NULL_TIME,
            "near_max_ttl": {"type": "boolean"},
            "renewable": {"type": "boolean"},
        },
    },
    "PolicyPreview": {
        "type": "object",
        "required": ["issuer", "identity", "roles"],
        "properties": {
            "issuer": {"type": "string"},
            "identity": {
                "type": "object",
                "properties": {
                    k: {"type": "string"} for k in ("subject", "workload", "instance_id")
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
    "Job": _JOB,
}
