"""The async front of identity: pick the issuer, get its key, verify."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from broker.clock import Clock
from broker.errors import TokenInvalid
from broker.identity.jwks import JwksCache
from broker.identity.model import Identity
from broker.identity.settings import IdentitySettings
from broker.identity.verify import inspect_token, refuse, verify_signed

# The fixed `iss` of legacy (secret-based) service-account tokens.
LEGACY_K8S_ISSUER = "kubernetes/serviceaccount"


class IdentityVerifier:
    def __init__(
        self, settings: IdentitySettings, session: aiohttp.ClientSession, clock: Clock
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._by_iss: Mapping[str, JwksCache] = {
            i.issuer: JwksCache(i, session) for i in settings.issuers
        }
        self._max_bytes = max(i.max_token_bytes for i in settings.issuers)
        self._has_kubernetes = any(i.kind == "kubernetes" for i in settings.issuers)

    @property
    def caches(self) -> list[JwksCache]:
        return list(self._by_iss.values())

    async def verify(self, raw: str) -> Identity:
        unverified = inspect_token(raw, max_bytes=self._max_bytes)
        cache = self._by_iss.get(unverified.issuer)
        if cache is None:
            if unverified.issuer == LEGACY_K8S_ISSUER and self._has_kubernetes:
                raise refuse(
                    "token_legacy_serviceaccount",
                    "legacy service-account tokens never expire and are bound to no pod; "
                    "mount a projected serviceAccountToken with the broker's audience instead",
                )
            raise refuse("token_unknown_issuer", "the token's issuer is not configured")
        key = await cache.key_for(unverified.kid, unverified.alg)
        try:
            return verify_signed(
                raw,
                unverified,
                cache.issuer,
                key,
                audience=self._settings.audience,
                now=self._clock.now(),
            )
        except TokenInvalid as exc:
            # The claim checks refuse without naming the issuer; the refusal is counted
            # against it (metrics: refusals by reason and issuer).
            raise TokenInvalid(exc.message, code=exc.code, issuer_name=cache.issuer.name) from None
