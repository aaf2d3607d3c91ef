"""The OpenAPI description of ``POST /v1/token``, RFC 8693 token exchange (issue 14,
contract B): form-encoded, no client authentication (the subject token is the
credential), one issuance path with ``POST /v1/credentials``; and the links from a
credential's ``lease_id`` to its renewal and release, which both answers carry."""

from __future__ import annotations

from typing import Any

from broker.api.openapi_parts import LEASE_ID, ROLE, TIME

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
SUBJECT_TOKEN_TYPES = [
    "urn:ietf:params:oauth:token-type:jwt",
    "urn:ietf:params:oauth:token-type:id_token",
    "urn:ietf:params:oauth:token-type:access_token",
]
# A credential's lease_id leads to its renewal and its release (stateful testing follows).
LEASE_LINKS = {
    "RenewLease": {
        "operationId": "renewLease",
        "parameters": {"lease_id": "$response.body#/lease_id"},
        "description": "renew the lease this credential is held under",
    },
    "ReleaseLease": {
        "operationId": "releaseLease",
        "parameters": {"lease_id": "$response.body#/lease_id"},
        "description": "give the credential back early",
    },
}
_URN = {"type": "string", "minLength": 1}
_NO_STORE = {
    "Cache-Control": {"required": True, "schema": {"type": "string", "enum": ["no-store"]}},
}
TOKEN_SCHEMAS: dict[str, Any] = {
    "TokenExchangeRequest": {
        "type": "object",
        "description": "RFC 8693 §2.1. audience or resource names the broker role (both "
        "given and different: invalid_request). scope is accepted and not used. "
        "requested_token_type, when given, must be the type the role issues. actor_token "
        "and actor_token_type are refused (invalid_request), as is any parameter given "
        "twice.",
        "required": ["grant_type", "subject_token", "subject_token_type"],
        "properties": {
            "grant_type": {"type": "string", "enum": [TOKEN_EXCHANGE]},
            "subject_token": {
                "type": "string",
                "minLength": 1,
                "description": "the workload's identity JWT, verified as for "
                "POST /v1/credentials (same issuers, replay rules and policy)",
            },
            "subject_token_type": {"type": "string", "enum": SUBJECT_TOKEN_TYPES},
            "audience": ROLE,
            "resource": ROLE,
            "scope": {"type": "string", "description": "accepted; not used"},
            "requested_token_type": {
                **_URN,
                "description": "urn:ietf:params:oauth:token-type:jwt (an oidc_token role), "
                "or urn:credential-broker:token-type:<kind> for any other kind",
            },
            "actor_token": {"type": "string", "description": "refused: invalid_request"},
            "actor_token_type": {"type": "string", "description": "refused: invalid_request"},
        },
    },
    "TokenExchangeResponse": {
        "type": "object",
        "description": "RFC 8693 §2.2, with the broker's extension members: the credential's "
        "lease, and its data fields other than the one in access_token",
        "required": ["access_token", "issued_token_type", "token_type", "expires_in"],
        "additionalProperties": True,
        "properties": {
            "access_token": {
                "type": "string",
                "description": "an oidc_token's JWT; for any other kind its primary secret "
                "(e.g. a database login's password)",
            },
            "issued_token_type": _URN,
            "token_type": {"type": "string", "enum": ["Bearer", "N_A"]},
            "expires_in": {"type": "integer", "minimum": 1},
            "lease_id": LEASE_ID,
            "renewable": {"type": "boolean"},
            "expires_at": TIME,
            "kind": {"type": "string"},
            "role": {"type": "string"},
        },
    },
    "OAuthError": {
        "type": "object",
        "description": "RFC 6749 §5.2, with broker_error: the broker's own error code",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "string",
                "enum": [
                    "invalid_request",
                    "invalid_target",
                    "unsupported_grant_type",
                    "temporarily_unavailable",
                ],
            },
            "error_description": {"type": "string"},
            "broker_error": {"type": "string"},
        },
    },
}


def _oauth_error(desc: str) -> dict[str, Any]:
    return {
        "description": desc,
        "headers": _NO_STORE,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OAuthError"}}},
    }


def token_paths() -> dict[str, Any]:
    return {
        "/v1/token": {
            "post": {
                "summary": "RFC 8693 token exchange: an identity token for the named role's "
                "credential, through the same issuance as POST /v1/credentials (recorded, "
                "leased, limited and revoked alike). No client authentication",
                "operationId": "exchangeToken",
                "security": [],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/x-www-form-urlencoded": {
                            "schema": {"$ref": "#/components/schemas/TokenExchangeRequest"}
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "issued",
                        "headers": {
                            **_NO_STORE,
                            "Pragma": {
                                "required": True,
                                "schema": {"type": "string", "enum": ["no-cache"]},
                            },
                        },
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/TokenExchangeResponse"}
                            }
                        },
                        "links": LEASE_LINKS,
                    },
                    "400": _oauth_error(
                        "invalid_request (a missing, repeated or bad parameter; a bad, "
                        "expired, replayed or unsupported subject token; an actor_token), "
                        "invalid_target (unknown role, policy refusal, lock, a type or parameter "
                        "the role cannot serve, an OIDC token outliving its grant: one "
                        "answer), "
                        "unsupported_grant_type"
                    ),
                    "409": _oauth_error(
                        "invalid_request: the instance has been terminated "
                        "(instance_terminated) or its lease limit for the role is reached "
                        "(lease_limit_reached)"
                    ),
                    "413": _oauth_error(
                        "invalid_request: the body is too large (payload_too_large)"
                    ),
                    "502": _oauth_error("Vault refused (temporarily_unavailable)"),
                    "503": _oauth_error(
                        "Vault or the store is unavailable (temporarily_unavailable)"
                    ),
                },
            }
        }
    }
