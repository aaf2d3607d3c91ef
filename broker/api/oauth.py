"""OAuth 2.0 Token Exchange (RFC 8693) at ``POST /v1/token``, decided without I/O: the
form read and checked (``read_request``, ``target``, ``check_requested``), the credential
turned into a token response (``token_response``, by the ``ISSUED`` table of kinds), and
a refusal turned into an OAuth error (``refusal``). The handler (``broker.api.app``)
verifies the subject token and issues through the same service as ``/v1/credentials``.

Refusals are the broker's own errors (``BadRequest`` with a stable code, ``TokenInvalid``,
``NotPermitted``...), so logs and metrics keep one vocabulary; ``refusal`` maps each to
RFC 6749 §5.2's ``error`` and keeps the code in ``broker_error``. Every ``NotPermitted``
(unknown role, policy refusal, lock) is one identical ``invalid_target`` answer, so a
caller cannot tell a role that exists from one that does not."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from broker.api.decode import ROLE_PATTERN
from broker.clock import iso_z
from broker.errors import BadRequest, BrokerError, NotPermitted, TokenInvalid
from broker.issuance.service import IssuedCredential

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT = "urn:ietf:params:oauth:token-type:jwt"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
SUBJECT_TOKEN_TYPES = (JWT, ID_TOKEN, ACCESS_TOKEN)  # each verified as the identity JWT
BROKER_TOKEN_TYPE = "urn:credential-broker:token-type:"
FORM = "application/x-www-form-urlencoded"
# RFC 6749 §5.1 and RFC 8693 §2.2.1: a token response is never cached, nor an error.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

PARAMETERS = (
    "grant_type",
    "subject_token",
    "subject_token_type",
    "audience",
    "resource",
    "scope",
    "requested_token_type",
    "actor_token",
    "actor_token_type",
)
MAX_FIELDS = 64  # a form with more fields than this is not a token request

# One answer for an unknown role, a policy refusal and a lock (RFC 8693 §2.2.2).
TARGET_REFUSED = "the audience or resource names no broker role this subject token may have"
TARGET_CODE = "role_not_permitted"


@dataclass(frozen=True)
class Issued:
    """How a kind of credential answers a token exchange: which ``data`` field is the
    ``access_token`` (a value that is not text, as compact JSON), its ``token_type`` and
    its ``issued_token_type``."""

    field: str
    token_type: str
    issued_token_type: str


def _broker_type(kind: str, field: str) -> Issued:
    return Issued(field, "N_A", BROKER_TOKEN_TYPE + kind)


# By credential kind: which value is the access_token. The rest of ``data`` is returned
# as extension members. ``N_A`` (RFC 8693 §2.2.1): the value is not an OAuth access token.
ISSUED: Mapping[str, Issued] = {
    "oidc_token": Issued("token", "Bearer", JWT),
    "database_login": _broker_type("database_login", "password"),
    "rabbitmq_login": _broker_type("rabbitmq_login", "password"),
    # The certificate, in both PKI modes (``sign`` returns no key); ``private_key``, where
    # Vault made one, is an extension member.
    "x509_certificate": _broker_type("x509_certificate", "certificate"),
    "ssh_certificate": _broker_type("ssh_certificate", "signed_key"),
    "aws_credentials": _broker_type("aws_credentials", "SecretAccessKey"),
    "azure_service_principal": _broker_type("azure_service_principal", "AZURE_CLIENT_SECRET"),
    # An OAuth access token (``data.type`` access_token) or a key file (service_account_key,
    # its ``credentials`` as compact JSON): see ``_primary``.
    "gcp_credential": _broker_type("gcp_credential", "access_token"),
    "static_secret": _broker_type("static_secret", "values"),  # compact JSON
}
ISSUED_TOKEN_TYPES = frozenset(i.issued_token_type for i in ISSUED.values())
# Members of the response that a credential's data field of the same name never replaces.
RESERVED = frozenset(
    {
        "access_token",
        "issued_token_type",
        "token_type",
        "expires_in",
        "refresh_token",
        "scope",
        "lease_id",
        "renewable",
        "expires_at",
        "kind",
        "role",
    }
)


@dataclass(frozen=True)
class TokenRequest:
    """A token exchange's parameters, checked as far as they can be without the subject
    token's identity (``target`` and ``check_requested`` do the rest)."""

    subject_token: str
    subject_token_type: str
    role: str  # the audience or resource, not yet checked as a role name
    requested_token_type: str | None

    def __repr__(self) -> str:  # the subject token is a credential: never printed
        return (
            f"TokenRequest(subject_token=***, subject_token_type={self.subject_token_type!r}, "
            f"role={self.role!r}, requested_token_type={self.requested_token_type!r})"
        )


def _invalid(message: str, code: str) -> BadRequest:
    return BadRequest(message, code=code)


def _form(content_type: str, raw: bytes) -> dict[str, list[str]]:
    if content_type != FORM:
        raise _invalid(f"send the token request as {FORM}", "unsupported_media_type")
    try:
        pairs = parse_qsl(
            raw.decode("utf-8"),
            keep_blank_values=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        raise _invalid(
            f"the request body is not a form of at most {MAX_FIELDS} fields in UTF-8",
            "malformed_form",
        ) from None
    fields: dict[str, list[str]] = {}
    for name, value in pairs:
        if name in PARAMETERS:  # RFC 6749 §3.2: unrecognized parameters are ignored
            fields.setdefault(name, []).append(value)
    return fields


def read_request(content_type: str, raw: bytes) -> TokenRequest:
    """The token request in a form body, or a ``BadRequest`` saying what is wrong (code
    ``unsupported_grant_type`` for another grant). A parameter sent empty counts as not
    sent (RFC 6749 §3.1); one sent twice is refused; ``scope`` is accepted and not used."""
    fields = _form(content_type, raw)
    for name in PARAMETERS:  # in this order, so a refusal is the same for the same form
        if len(fields.get(name, ())) > 1:
            raise _invalid(f"the parameter {name} is sent more than once", "repeated_parameter")
    given = {name: values[0] for name, values in fields.items() if values[0]}
    grant = given.get("grant_type")
    if grant is None:
        raise _invalid("grant_type is required", "missing_parameter")
    if grant != GRANT_TYPE:
        raise _invalid(f"the only grant type is {GRANT_TYPE}", "unsupported_grant_type")
    if "actor_token" in given or "actor_token_type" in given:
        raise _invalid(
            "actor_token is not supported: the broker does not issue delegated credentials",
            "actor_token_refused",
        )
    for name in ("subject_token", "subject_token_type"):
        if name not in given:
            raise _invalid(f"{name} is required", "missing_parameter")
    if given["subject_token_type"] not in SUBJECT_TOKEN_TYPES:
        raise _invalid(
            "subject_token_type must be one of " + ", ".join(SUBJECT_TOKEN_TYPES),
            "unsupported_token_type",
        )
    audience, resource = given.get("audience"), given.get("resource")
    if audience is not None and resource is not None and audience != resource:
        raise _invalid(
            "audience and resource name different roles: send one role name",
            "conflicting_target",
        )
    role = audience if audience is not None else resource
    if role is None:
        raise _invalid("audience (or resource) is required: the broker role", "missing_parameter")
    requested = given.get("requested_token_type")
    if requested is not None and requested != ACCESS_TOKEN and requested not in ISSUED_TOKEN_TYPES:
        raise _invalid(
            "requested_token_type is not a type the broker issues",
            "unsupported_token_type",
        )
    # Surrounding whitespace is not part of a token, as in a bearer header: a token file
    # written with `echo` ends in a newline that file-sourced clients send as read.
    subject_token = given["subject_token"].strip()
    if not subject_token:
        raise _invalid("subject_token is required", "missing_parameter")
    return TokenRequest(subject_token, given["subject_token_type"], role, requested)


def target(role: str) -> str:
    """The role an exchange names; a name that cannot be a role is refused exactly as an
    unknown or refused role is (``invalid_target``), never differently."""
    if not ROLE_PATTERN.match(role):
        raise NotPermitted(TARGET_REFUSED)
    return role


def needs_kind(requested: str | None) -> bool:
    """Whether the role's kind must be known before issuing: only when a particular type
    is requested. ``access_token`` asks for the role's credential, whatever its kind
    (RFC 8693 clients such as google-auth always send it)."""
    return requested is not None and requested != ACCESS_TOKEN


def check_requested(requested: str | None, kind: str | None) -> None:
    """Refuse before issuing when the role (of ``kind``; None: not permitted, or unknown)
    does not issue the ``requested`` type. Both are one ``invalid_target`` answer: a
    different one for another kind would tell a role the subject may have (and its kind)
    from one that does not exist, to a workload under a lock too, which is asked nothing
    before ``issue``. The log line keeps the code ``requested_token_type_unavailable``."""
    if kind is None:
        raise NotPermitted(TARGET_REFUSED)
    if needs_kind(requested) and requested != ISSUED[kind].issued_token_type:
        raise NotPermitted(
            "the role does not issue the requested_token_type",
            code="requested_token_type_unavailable",
        )


def unservable(exc: BadRequest) -> NotPermitted:
    """A role this door cannot serve, refused by the role's engine once policy allowed it
    (it needs a caller parameter the form cannot carry: a PKI ``sign`` role's CSR, an SSH
    role's public key), answered as a role that does not exist: else the answer tells a
    role the subject may have from one that does not exist, to a locked workload too,
    whose lock is only checked after. The log line keeps the engine's code."""
    return NotPermitted(TARGET_REFUSED, code=exc.code)


def _compact(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _primary(kind: str, data: Mapping[str, Any]) -> tuple[str, str]:
    """The data field that is the access_token, and its token_type."""
    issued = ISSUED[kind]
    if kind == "gcp_credential":
        if data.get("type") == "service_account_key":
            return "credentials", "N_A"
        return "access_token", "Bearer"  # an OAuth bearer token for Google's APIs
    return issued.field, issued.token_type


def token_response(credential: IssuedCredential) -> dict[str, Any]:
    """RFC 8693 §2.2.1's answer for an issued credential: the primary secret as
    ``access_token``, ``expires_in`` in whole seconds (rounded up, at least 1: some
    clients fail without it), and as extension members the lease and the rest of the
    credential's ``data`` (a field named like a member above is left out)."""
    field, token_type = _primary(credential.kind, credential.data)
    lifetime = (credential.expires_at - credential.issued_at).total_seconds()
    out: dict[str, Any] = {
        "access_token": _compact(credential.data.get(field)),
        "issued_token_type": ISSUED[credential.kind].issued_token_type,
        "token_type": token_type,
        "expires_in": max(1, math.ceil(lifetime)),
        "lease_id": credential.lease_id,
        "renewable": credential.renewable,
        "expires_at": iso_z(credential.expires_at),
        "kind": credential.kind,
        "role": credential.role,
    }
    for name, value in credential.data.items():
        if name != field and name not in RESERVED:
            out[name] = value
    return out


@dataclass(frozen=True)
class OAuthRefusal:
    status: int
    error: str
    description: str
    broker_error: str

    def body(self) -> dict[str, str]:
        return {
            "error": self.error,
            "error_description": self.description,
            "broker_error": self.broker_error,
        }


def _description(text: str) -> str:
    """RFC 6749 §5.2: error_description is %x20-21 / %x23-5B / %x5D-7E (no quote, no
    backslash, ASCII)."""
    return "".join(
        c if " " <= c <= "~" and c not in '"\\' else ("'" if c == '"' else "?") for c in text
    )


def refusal(exc: BrokerError) -> OAuthRefusal:
    """A refusal as an OAuth error (RFC 8693 §2.2.2, RFC 6749 §5.2). A bad subject token,
    a bad form and ``unsupported_grant_type`` answer 400; every ``NotPermitted`` the one
    ``invalid_target``; other refusals keep their status (409 as ``invalid_request``; 502 and 503 as
    ``temporarily_unavailable``), with the broker's code in ``broker_error``."""
    if isinstance(exc, NotPermitted):
        return OAuthRefusal(400, "invalid_target", TARGET_REFUSED, TARGET_CODE)
    if exc.code == "unsupported_grant_type":
        return OAuthRefusal(400, "unsupported_grant_type", _description(exc.message), exc.code)
    if isinstance(exc, TokenInvalid | BadRequest):
        return OAuthRefusal(400, "invalid_request", _description(exc.message), exc.code)
    if exc.status in (502, 503):  # Vault or the store: worth trying again
        return OAuthRefusal(
            exc.status, "temporarily_unavailable", _description(exc.message), exc.code
        )
    if exc.status >= 500:
        return OAuthRefusal(exc.status, "server_error", _description(exc.message), exc.code)
    return OAuthRefusal(exc.status, "invalid_request", _description(exc.message), exc.code)


def too_large() -> OAuthRefusal:
    """A body over the server's limit (aiohttp's 413, not a broker error)."""
    return OAuthRefusal(
        413, "invalid_request", "the request body is too large", "payload_too_large"
    )
