"""Who is calling the admin API: a named operator with a scope.

Scopes nest: ``read`` (list, show, explain, audit), ``revoke`` (terminate, lock, and all
of ``read``), ``admin`` (everything, including retry and reconcile with orphan revocation).
Every admin handler names the scope it needs and receives the ``Operator`` it records as
the actor of what it changes.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class Scope(enum.IntEnum):
    READ = 1
    REVOKE = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Operator:
    """An authenticated admin caller. ``via`` says how (``token``, ``oidc``)."""

    name: str
    scope: Scope
    via: str = "token"

    @property
    def actor(self) -> str:
        """How the store and the audit name this operator."""
        return f"operator:{self.name}"

    def may(self, needed: Scope) -> bool:
        return self.scope >= needed


SCOPES = {"read": Scope.READ, "revoke": Scope.REVOKE, "admin": Scope.ADMIN}
# A name an OIDC claim gives an operator: an e-mail address or a subject, printable, short.
_CLAIMED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+:|/-]{0,127}\Z")
# The domain tag of refusal fingerprints: the same token gives the same fingerprint on every
# replica (refusals can be correlated), truncated so that it identifies, never reveals. Alone
# it is public (anyone can test a guessed token against an audit's fingerprint), so the
# deployment's secret ``audit.hash_key``, when configured, keys it (``fingerprint_key``).
_FINGERPRINT_KEY = b"ephemeral-broker/admin-refusal/v1"


@dataclass(frozen=True)
class StaticOperator:
    """A named static token, known by its SHA-256 (hex)."""

    name: str
    token_sha256: str
    scope: Scope


@dataclass(frozen=True)
class ScopeRule:
    """A claim value that grants a scope; a list claim matches when it holds the value."""

    claim: str
    value: str
    scope: Scope


def token_digest(presented: str) -> str:
    return hashlib.sha256(presented.encode("utf-8", "surrogateescape")).hexdigest()


def static_operator(
    presented: str, operators: Sequence[StaticOperator]
) -> StaticOperator | None:
    """The operator whose token this is, or None. Every configured hash is compared, each in
    constant time, so the time taken says nothing about which (or whether one) matched."""
    digest = token_digest(presented)
    found: StaticOperator | None = None
    for operator in operators:
        if hmac.compare_digest(digest, operator.token_sha256):
            found = operator
    return found


def _claim_values(claims: Mapping[str, Any], name: str) -> list[str]:
    value = claims.get(name)
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, str | int):
            out.append(str(v))
    return out


def scope_from_claims(claims: Mapping[str, Any], rules: Sequence[ScopeRule]) -> Scope | None:
    """The highest scope a rule grants these claims; None when no rule matches (refused).
    A claim that is neither a string, a number nor a list of them matches nothing."""
    granted = [r.scope for r in rules if r.value in _claim_values(claims, r.claim)]
    return max(granted) if granted else None


def operator_name(claims: Mapping[str, Any], name_claim: str) -> str | None:
    """The operator's name from ``name_claim`` (default e-mail) and from nothing else; None if
    it is not a short printable name. An e-mail names someone only when the issuer says it
    verified it (``email_verified``); there is no fallback to ``sub``, whose values live in
    another namespace (a subject may well look like somebody's e-mail address)."""
    value = claims.get(name_claim)
    verified = claims.get("email_verified")
    if name_claim == "email" and verified is not True and verified != "true":
        return None
    if isinstance(value, str) and _CLAIMED_NAME.match(value):
        return value
    return None


def looks_like_jwt(presented: str) -> bool:
    parts = presented.split(".")
    return len(parts) == 3 and all(parts[:2])


def fingerprint_key(secret: bytes | None) -> bytes:
    """The key of refusal fingerprints: derived from the deployment's secret (its own
    domain, so a fingerprint is never a token-id hash), or the public tag without one."""
    if secret is None:
        return _FINGERPRINT_KEY
    return hmac.new(secret, _FINGERPRINT_KEY, "sha256").digest()


def fingerprint(presented: str, key: bytes = _FINGERPRINT_KEY) -> str:
    """A short, keyed, irreversible fingerprint of a refused token: the same token gives the
    same fingerprint, and the audit never holds the token or its plain SHA-256 (which is
    what the configuration stores). ``key`` from ``fingerprint_key``."""
    mac = hmac.new(key, presented.encode("utf-8", "surrogateescape"), "sha256")
    return "fp:" + mac.hexdigest()[:12]
