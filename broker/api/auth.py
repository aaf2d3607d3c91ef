"""Who an admin caller is: a named static token, or a JWT of the operator issuer.

The decisions are the pure functions of ``broker.api.operators`` (which operator a static
token is; a name and a scope from verified claims); this object adds the operator
issuer's key cache and the clock. A JWT is checked by the very code that checks
workloads' tokens (``broker.identity.verify``): pinned algorithms, key type, audience,
issuer, expiry with the issuer's leeway, maximum lifetime. Replay of an operator's JWT is
allowed (it is a bearer session for as long as it lives); expiry is not negotiable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from broker.api.operators import (
    SCOPES,
    Operator,
    Scope,
    ScopeRule,
    StaticOperator,
    fingerprint,
    fingerprint_key,
    looks_like_jwt,
    operator_name,
    scope_from_claims,
    static_operator,
)
from broker.api.settings import AdminSettings, OperatorIssuerSettings
from broker.clock import Clock
from broker.errors import AdminForbidden, AdminUnauthorized, BrokerError, TokenInvalid
from broker.identity.jwks import JwksCache
from broker.identity.verify import inspect_token, verify_claims


class OperatorRefused(BrokerError):
    """An admin caller refused, named for the audit: the ``operator`` when known, else a
    ``token`` fingerprint (never the token)."""

    def __init__(
        self, error: BrokerError, *, operator: str | None = None, fingerprint: str | None = None
    ) -> None:
        super().__init__(error.message, code=error.code)
        self.status = error.status
        self.operator = operator
        self.fingerprint = fingerprint


@dataclass(frozen=True)
class OidcOperators:
    issuer: OperatorIssuerSettings
    rules: tuple[ScopeRule, ...]


class OperatorAuthenticator:
    """``authenticate(presented, needed)`` → the ``Operator``, or ``OperatorRefused``."""

    def __init__(
        self,
        static: Sequence[StaticOperator],
        *,
        oidc: OperatorIssuerSettings | None = None,
        session: aiohttp.ClientSession | None = None,
        clock: Clock | None = None,
        secret: bytes | None = None,
    ) -> None:
        self._static = tuple(static)
        self._fingerprint_key = fingerprint_key(secret)
        self._static_names = frozenset(o.name.casefold() for o in self._static)
        self._oidc = oidc
        self._rules = tuple(
            ScopeRule(r.claim, r.value, SCOPES[r.scope]) for r in (oidc.scopes if oidc else ())
        )
        if oidc is not None and (session is None or clock is None):
            raise ValueError("an operator issuer needs an HTTP session and a clock")
        self._keys = JwksCache(oidc, session) if oidc is not None and session else None
        self._clock = clock

    @classmethod
    def from_settings(
        cls,
        settings: AdminSettings,
        *,
        session: aiohttp.ClientSession,
        clock: Clock,
        secret: bytes | None = None,
    ) -> OperatorAuthenticator:
        """``secret``: ``audit.hash_key``, which keys refusals' token fingerprints."""
        static = [
            StaticOperator(o.name, o.token_sha256, SCOPES[o.scope])
            for o in settings.static_operators()
        ]
        return cls(static, oidc=settings.oidc, session=session, clock=clock, secret=secret)

    def _fingerprint(self, presented: str) -> str:
        return fingerprint(presented, self._fingerprint_key)

    async def authenticate(self, presented: str, needed: Scope) -> Operator:
        operator = await self._who(presented)
        if not operator.may(needed):
            raise OperatorRefused(
                AdminForbidden(
                    f"operator {operator.name} has the {operator.scope.label} scope; "
                    f"this call needs {needed.label}",
                    code="operator_scope_insufficient",
                ),
                operator=operator.name,
            )
        return operator

    async def _who(self, presented: str) -> Operator:
        found = static_operator(presented, self._static)
        if found is not None:
            return Operator(found.name, found.scope, "token")
        if self._keys is not None and looks_like_jwt(presented):
            return await self._from_jwt(presented)
        raise OperatorRefused(
            AdminForbidden("this call needs an operator's admin token"),
            fingerprint=self._fingerprint(presented),
        )

    async def _from_jwt(self, raw: str) -> Operator:
        assert self._oidc is not None and self._keys is not None and self._clock is not None
        try:
            unverified = inspect_token(raw, max_bytes=self._oidc.max_token_bytes)
            if unverified.issuer != self._oidc.issuer:
                raise TokenInvalid("not the operator issuer", code="token_unknown_issuer")
            key = await self._keys.key_for(unverified.kid, unverified.alg)
            claims = verify_claims(
                raw,
                unverified,
                self._oidc,
                key,
                audience=self._oidc.audience,
                now=self._clock.now(),
            )
        except TokenInvalid as exc:
            raise OperatorRefused(
                AdminUnauthorized(
                    f"the operator token was refused ({exc.code})", code="operator_token_invalid"
                ),
                fingerprint=self._fingerprint(raw),
            ) from None
        name = operator_name(claims, self._oidc.name_claim)
        if name is None:
            raise OperatorRefused(
                AdminUnauthorized(
                    f"the operator token names nobody: no usable '{self._oidc.name_claim}' "
                    "claim (an e-mail must come with email_verified: true)",
                    code="operator_token_invalid",
                ),
                fingerprint=self._fingerprint(raw),
            )
        if name.casefold() in self._static_names:
            # "operator:admin" must mean one person in the audit, not whoever the issuer
            # calls admin (or ADMIN).
            raise OperatorRefused(
                AdminUnauthorized(
                    f"the operator token names {name}, a static-token operator",
                    code="operator_token_invalid",
                ),
                fingerprint=self._fingerprint(raw),
            )
        scope = scope_from_claims(claims, self._rules)
        if scope is None:
            raise OperatorRefused(
                AdminForbidden(
                    f"operator {name} is not granted any scope by admin.oidc.scopes",
                    code="operator_no_scope",
                ),
                operator=name,
            )
        return Operator(name, scope, "oidc")
