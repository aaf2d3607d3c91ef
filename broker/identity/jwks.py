"""An issuer's signing keys, fetched over HTTP and cached.

Rules that keep an attacker from steering this cache:
- a refresh caused by an unknown ``kid`` happens at most once per cooldown, and concurrent
  requests share one fetch, so a spray of random ``kid``s costs the issuer one request;
- an empty or unparsable key set is never cached: the last good one stays in use;
- the last good keys keep serving while the issuer is down, up to ``jwks_stale_max_s``;
- responses are bounded in size and time; symmetric (``oct``) keys are ignored, and so is a
  key published for another use (``use`` other than ``sig``, or ``key_ops`` present without
  ``verify``: RFC 7517 §4.2, §4.3) or with its private part;
- a key set with no usable key at all is the issuer's (or its configuration's) problem, and
  the log and the refusal say so rather than "cannot be fetched".
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt

from broker.errors import TokenInvalid, UpstreamUnavailable
from broker.identity.settings import IssuerSettings
from broker.settings import require_tls_off_loopback

log = logging.getLogger(__name__)
MIN_CACHE_SECONDS = 10
_MAX_AGE = re.compile(r"max-age=(\d+)")


@dataclass(frozen=True)
class SigningKey:
    kid: str | None
    alg: str | None  # the key's own "alg", if it names one: then only that algorithm
    key: Any


@dataclass
class _KeySet:
    keys: tuple[SigningKey, ...]
    fetched_at: float
    fresh_until: float


@dataclass
class FetchStats:
    attempts: int = 0
    failures: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


class NoUsableKey(ValueError):
    """A key set that parsed but holds no key the broker may verify a signature with."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def unusable(entry: Any, *, use: str = "sig") -> str | None:
    """Why one JWKS entry is not a key to verify signatures with, or None if it may be one
    (whether it loads is PyJWT's to say)."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    kty = entry.get("kty")
    if kty == "oct":
        return "a symmetric (oct) key"
    if kty not in ("RSA", "EC", "OKP"):
        return f"key type {_shown(kty)} is not RSA, EC or OKP"
    if entry.get("use", "sig" if use == "sig" else None) != use:
        return f"use is {_shown(entry.get('use'))}, not {use!r}"
    if "key_ops" in entry:
        ops = entry["key_ops"]
        if not isinstance(ops, list) or "verify" not in ops:
            return f"key_ops {_shown(ops)} does not include 'verify'"
    if any(k in entry for k in ("d", "p", "q")):
        return "it holds a private key"  # published by mistake: not used as a public one
    return None


def parse_jwks(document: Any, *, use: str = "sig") -> tuple[SigningKey, ...]:
    """Usable signature keys of a JWKS document (``unusable`` says which are not).
    A SPIFFE bundle is a JWKS whose JWT-SVID keys say ``use: jwt-svid`` (and must)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document")
    out = []
    for entry in document["keys"]:
        if unusable(entry, use=use) is not None:
            continue
        try:
            key = jwt.PyJWK(entry).key
        except Exception:  # noqa: BLE001, S112 — one bad entry (alg none, odd curve) is skipped
            continue
        kid = entry.get("kid") if isinstance(entry.get("kid"), str) else None
        alg = entry.get("alg") if isinstance(entry.get("alg"), str) else None
        out.append(SigningKey(kid=kid, alg=alg, key=key))
    return tuple(out)


def why_no_usable_key(document: Any, *, use: str = "sig", at_most: int = 5) -> str:
    """For an operator: why each entry of a JWKS document (that ``parse_jwks`` found no
    usable key in) was passed over, the first ``at_most`` of them."""
    entries = document.get("keys", []) if isinstance(document, dict) else []
    if not entries:
        return "the key set is empty"
    reasons = []
    for idx, entry in enumerate(entries[:at_most]):
        kid = entry.get("kid") if isinstance(entry, dict) else None
        name = f"kid {_shown(kid)}" if isinstance(kid, str) else f"key {idx}"
        reasons.append(f"{name}: {unusable(entry, use=use) or 'does not load as a public key'}")
    more = f"; and {len(entries) - at_most} more" if len(entries) > at_most else ""
    return f"{len(entries)} key(s), none usable: " + "; ".join(reasons) + more


class JwksCache:
    def __init__(
        self,
        issuer: IssuerSettings,
        session: aiohttp.ClientSession,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._issuer = issuer
        self._session = session
        self._now = monotonic
        self._set: _KeySet | None = None
        self._last_attempt: float | None = None
        self._lock = asyncio.Lock()
        self._no_usable_key: str | None = None  # why the last fetched set had no usable key
        self.stats = FetchStats()

    @property
    def issuer(self) -> IssuerSettings:
        return self._issuer

    def counts(self) -> dict[str, int]:
        """Fetch outcomes (success, failure) since start, for the metrics."""
        return dict(self.stats.outcomes)

    async def key_for(self, kid: str | None, alg: str) -> Any:
        now = self._now()
        current = self._set
        if current is None or now >= current.fresh_until:
            await self._refresh(reason="expired")
        elif self._find(kid, alg) is None:
            await self._refresh(reason="unknown_kid")
        current = self._set
        if current is None and self._no_usable_key is not None:
            raise UpstreamUnavailable(
                f"the key set of issuer {self._issuer.name} holds no usable signing key: "
                "an issuer configuration problem (see the broker's log)",
                code="jwks_unavailable",
                issuer_name=self._issuer.name,
            )
        if current is None:
            raise UpstreamUnavailable(
                f"the signing keys of issuer {self._issuer.name} cannot be fetched",
                code="jwks_unavailable",
                issuer_name=self._issuer.name,
            )
        if self._now() > current.fresh_until + self._issuer.jwks_stale_max_s:
            raise UpstreamUnavailable(
                f"the signing keys of issuer {self._issuer.name} are too old to trust",
                code="jwks_unavailable",
                issuer_name=self._issuer.name,
            )
        found = self._find(kid, alg)
        if found is None:
            raise TokenInvalid(
                "the token's key is not in the issuer's key set",
                code="token_unknown_key",
                issuer_name=self._issuer.name,
            )
        return found

    def _find(self, kid: str | None, alg: str) -> Any | None:
        if self._set is None:
            return None
        usable = [k for k in self._set.keys if k.alg in (None, alg)]
        if kid is not None:
            hits = [k for k in usable if k.kid == kid]
        else:
            hits = usable if len(usable) == 1 else []
        return hits[0].key if len(hits) == 1 else None

    async def _refresh(self, *, reason: str) -> None:
        async with self._lock:
            now = self._now()
            if (
                self._last_attempt is not None
                and now - self._last_attempt < self._issuer.jwks_refresh_cooldown_s
            ):
                return  # someone fetched (or failed) just now: use what that gave
            self._last_attempt = now
            self.stats.attempts += 1
            try:
                keys, ttl = await self._fetch()
            except Exception as exc:  # noqa: BLE001 — any failure keeps the last good set
                self.stats.failures += 1
                self.stats.outcomes["failure"] = self.stats.outcomes.get("failure", 0) + 1
                self._no_usable_key = str(exc) if isinstance(exc, NoUsableKey) else None
                if isinstance(exc, NoUsableKey):
                    log.warning(
                        "jwks holds no usable signing key: an issuer configuration problem "
                        "(the issuer publishes no key for signatures, or the broker's issuer "
                        "settings point at the wrong key set)",
                        extra={"issuer": self._issuer.name, "reason": reason, "keys": str(exc)},
                    )
                    return
                log.warning(
                    "jwks fetch failed",
                    extra={
                        "issuer": self._issuer.name,
                        "reason": reason,
                        "error": type(exc).__name__,
                    },
                )
                return
            self.stats.outcomes["success"] = self.stats.outcomes.get("success", 0) + 1
            self._no_usable_key = None
            fetched = self._now()
            self._set = _KeySet(keys=keys, fetched_at=fetched, fresh_until=fetched + ttl)

    async def refresh_if_stale(self) -> None:
        """For the periodic tick: refresh a key set that is past its freshness."""
        current = self._set
        if current is None or self._now() >= current.fresh_until:
            await self._refresh(reason="scheduled")

    async def _fetch(self) -> tuple[tuple[SigningKey, ...], float]:
        issuer = self._issuer
        ttl = float(issuer.jwks_cache_ttl_s)
        if issuer.key_source == "file":
            assert issuer.jwks_file is not None
            body = await asyncio.to_thread(_read_bounded, issuer.jwks_file, issuer.jwks_max_bytes)
            document = json.loads(body)
        else:
            uri = issuer.jwks_uri or issuer.spiffe_bundle_uri
            if issuer.key_source == "discovery":
                uri = await self._discover()
            assert uri is not None
            document, cache_control = await self._get_json(uri)
            match = _MAX_AGE.search(cache_control)
            if match:
                ttl = min(ttl, max(MIN_CACHE_SECONDS, int(match.group(1))))
        spiffe = issuer.key_source == "spiffe_bundle"
        if spiffe and isinstance(document, dict):
            hint = document.get("spiffe_refresh_hint")
            if isinstance(hint, int) and not isinstance(hint, bool) and hint > 0:
                ttl = min(ttl, max(MIN_CACHE_SECONDS, hint))
        use = "jwt-svid" if spiffe else "sig"
        keys = parse_jwks(document, use=use)
        if not keys:
            raise NoUsableKey(why_no_usable_key(document, use=use))
        return keys, ttl

    async def _discover(self) -> str:
        """OpenID discovery: the document must name this very issuer, and its jwks_uri is
        held to the same rules as a configured one."""
        url = self._issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"
        meta, _ = await self._get_json(url)
        if not isinstance(meta, dict) or meta.get("issuer") != self._issuer.issuer:
            raise ValueError("the discovery document names another issuer")
        uri = meta.get("jwks_uri")
        if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
            raise ValueError("the discovery document has no http(s) jwks_uri")
        return require_tls_off_loopback(uri)

    async def _get_json(self, url: str) -> tuple[Any, str]:
        limit = self._issuer.jwks_max_bytes
        timeout = aiohttp.ClientTimeout(total=self._issuer.jwks_timeout_s)
        async with self._session.get(url, timeout=timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"status {resp.status}")
            body = bytearray()
            while chunk := await resp.content.read(limit + 1 - len(body)):
                body += chunk
                if len(body) > limit:
                    raise ValueError("response larger than jwks_max_bytes")
            cache_control = resp.headers.get("Cache-Control", "")
        return json.loads(bytes(body)), cache_control


def _read_bounded(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        body = f.read(limit + 1)
    if len(body) > limit:
        raise ValueError("key file larger than jwks_max_bytes")
    return body
