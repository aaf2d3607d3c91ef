"""JwksCache against a real HTTP server on 127.0.0.1, with a monotonic clock the test moves.

The server serves whatever JWKS the test puts in it, can fail (500, garbage, down), and
counts every request: "how many times did the issuer get hit" is the number that matters
when an attacker sprays unknown ``kid``s.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from broker.clock import FixedClock
from broker.errors import TokenInvalid, UpstreamUnavailable
from broker.identity.jwks import (
    MIN_CACHE_SECONDS,
    JwksCache,
    parse_jwks,
    unusable,
    why_no_usable_key,
)
from broker.identity.settings import IdentitySettings, IssuerSettings
from broker.identity.verifier import IdentityVerifier
from tests.unit.identity.tokenkit import (
    AUDIENCE,
    ISSUER,
    NOW,
    RSA2048,
    Monotonic,
    claims,
    issuer,
    token,
)

# ------------------------------------------------------------------ keys and documents

K1 = ec.generate_private_key(ec.SECP256R1())
K2 = ec.generate_private_key(ec.SECP256R1())
K3 = ec.generate_private_key(ec.SECP256R1())
ED = ed25519.Ed25519PrivateKey.generate()


def jwk(key: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    """Public JWK of ``key`` (private keys are reduced to their public half)."""
    public = key.public_key() if hasattr(key, "private_bytes") else key
    if isinstance(public, ec.EllipticCurvePublicKey):
        data = json.loads(ECAlgorithm.to_jwk(public))
    elif isinstance(public, rsa.RSAPublicKey):
        data = json.loads(RSAAlgorithm.to_jwk(public))
    else:
        data = json.loads(OKPAlgorithm.to_jwk(public))
    data.pop("key_ops", None)
    if kid is not None:
        data["kid"] = kid
    data.update(extra)
    return data


def private_jwk(key: Any, kid: str) -> dict[str, Any]:
    """A JWK that carries the private part: published by mistake."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        data = json.loads(ECAlgorithm.to_jwk(key))
    elif isinstance(key, rsa.RSAPrivateKey):
        data = json.loads(RSAAlgorithm.to_jwk(key))
    else:
        data = json.loads(OKPAlgorithm.to_jwk(key))
    data.pop("key_ops", None)
    data["kid"] = kid
    return data


OCT = {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0", "alg": "HS256"}


def doc(*keys: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(keys)}


def same_key(found: Any, private: Any) -> bool:
    return found.public_numbers() == private.public_key().public_numbers()


# ------------------------------------------------------------------ the fake issuer


class JwksServer:
    """A JWKS endpoint whose answer the test changes between requests."""

    def __init__(self) -> None:
        self.document: Any = doc(jwk(K1, "k1"))
        self.raw: bytes | None = None  # served verbatim instead of ``document`` when set
        self.status = 200
        self.headers: dict[str, str] = {}
        self.delay = 0.0
        self.chunk_pause: float | None = None  # send the body in two chunks, pausing between
        self.requests = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks"

    def body(self) -> bytes:
        return self.raw if self.raw is not None else json.dumps(self.document).encode()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        body = self.body()
        if self.chunk_pause is not None:
            resp = web.StreamResponse(status=self.status, headers=self.headers)
            resp.content_type = "application/json"
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
            await asyncio.sleep(self.chunk_pause)
            await resp.write(body[len(body) // 2:])
            await resp.write_eof()
            return resp
        return web.Response(status=self.status, body=body, headers=self.headers,
                            content_type="application/json")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def server() -> AsyncIterator[JwksServer]:
    srv = JwksServer()
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def clock() -> Monotonic:
    return Monotonic()


def settings_for(server: JwksServer, **overrides: Any) -> IssuerSettings:
    values: dict[str, Any] = {
        "jwks_uri": server.url,
        "algorithms": ("ES256", "RS256", "EdDSA"),
        "jwks_cache_ttl_s": 300,
        "jwks_refresh_cooldown_s": 30,
        "jwks_stale_max_s": 3600,
        "jwks_max_bytes": 8192,
        "jwks_timeout_s": 2,
    }
    values.update(overrides)
    return issuer(**values)


def make_cache(server: JwksServer, session: aiohttp.ClientSession, clock: Monotonic,
               **overrides: Any) -> JwksCache:
    return JwksCache(settings_for(server, **overrides), session, monotonic=clock)


async def unknown_key(cache: JwksCache, kid: str | None, alg: str = "ES256") -> str:
    with pytest.raises(TokenInvalid) as caught:
        await cache.key_for(kid, alg)
    return caught.value.code


# ------------------------------------------------------------------ lookups


async def test_key_found_by_kid_and_cached(server: JwksServer, session: aiohttp.ClientSession,
                                           clock: Monotonic) -> None:
    server.document = doc(jwk(K1, "k1"), jwk(K2, "k2"), jwk(RSA2048, "r1", alg="RS256"))
    cache = make_cache(server, session, clock)

    assert same_key(await cache.key_for("k2", "ES256"), K2)
    assert same_key(await cache.key_for("k1", "ES256"), K1)
    assert same_key(await cache.key_for("r1", "RS256"), RSA2048)
    clock.advance(299)
    assert same_key(await cache.key_for("k1", "ES256"), K1)

    assert server.requests == 1
    assert (cache.stats.attempts, cache.stats.failures, cache.stats.outcomes) == (
        1, 0, {"success": 1})


async def test_key_pinned_to_another_alg_is_not_used(server: JwksServer,
                                                     session: aiohttp.ClientSession,
                                                     clock: Monotonic) -> None:
    server.document = doc(jwk(RSA2048, "r1", alg="RS256"))
    cache = make_cache(server, session, clock)
    assert same_key(await cache.key_for("r1", "RS256"), RSA2048)
    assert await unknown_key(cache, "r1", "PS256") == "token_unknown_key"
    assert server.requests == 1


# ------------------------------------------------------------------ kid sprays


async def test_sequential_spray_of_unknown_kids_costs_one_fetch_per_cooldown(
        server: JwksServer, session: aiohttp.ClientSession, clock: Monotonic) -> None:
    cache = make_cache(server, session, clock)
    assert same_key(await cache.key_for("k1", "ES256"), K1)
    assert server.requests == 1

    # Inside the cooldown of the first fetch: the spray costs nothing.
    codes = {await unknown_key(cache, secrets.token_hex(8)) for _ in range(200)}
    assert codes == {"token_unknown_key"}
    assert server.requests == 1

    # Cooldown over (set still fresh): one refetch for the whole spray.
    clock.advance(31)
    codes = {await unknown_key(cache, secrets.token_hex(8)) for _ in range(200)}
    assert codes == {"token_unknown_key"}
    assert server.requests == 2

    # 29 s later: still inside the cooldown of that refetch.
    clock.advance(29)
    assert await unknown_key(cache, "nope") == "token_unknown_key"
    assert server.requests == 2
    # 1 s more: a new window, one more fetch.
    clock.advance(1)
    for _ in range(200):
        await unknown_key(cache, secrets.token_hex(8))
    assert server.requests == 3

    # The real key kept working throughout, without extra fetches.
    assert same_key(await cache.key_for("k1", "ES256"), K1)
    assert server.requests == 3
    assert cache.stats.outcomes == {"success": 3}


async def test_concurrent_spray_of_unknown_kids_shares_one_fetch(
        server: JwksServer, session: aiohttp.ClientSession, clock: Monotonic) -> None:
    cache = make_cache(server, session, clock)
    assert same_key(await cache.key_for("k1", "ES256"), K1)
    clock.advance(31)
    server.delay = 0.05  # the fetch is in flight while the others pile up

    results = await asyncio.gather(
        *(cache.key_for(secrets.token_hex(8), "ES256") for _ in range(200)),
        return_exceptions=True)

    assert all(isinstance(r, TokenInvalid) for r in results)
    assert {r.code for r in results} == {"token_unknown_key"}
    assert server.requests == 2


async def test_concurrent_cold_start_shares_one_fetch(server: JwksServer,
                                                      session: aiohttp.ClientSession,
                                                      clock: Monotonic) -> None:
    cache = make_cache(server, session, clock)
    server.delay = 0.05

    results = await asyncio.gather(*(cache.key_for("k1", "ES256") for _ in range(200)),
                                   *(cache.key_for(secrets.token_hex(8), "ES256")
                                     for _ in range(50)),
                                   return_exceptions=True)

    assert all(same_key(r, K1) for r in results[:200])
    assert {type(r) for r in results[200:]} == {TokenInvalid}
    assert {r.code for r in results[200:]} == {"token_unknown_key"}
    assert server.requests == 1


# ------------------------------------------------------------------ rotation


async def test_rotation_is_followed_after_the_cooldown(server: JwksServer,
                                                       session: aiohttp.ClientSession,
                                                       clock: Monotonic) -> None:
    cache = make_cache(server, session, clock)
    assert same_key(await cache.key_for("k1", "ES256"), K1)

    server.document = doc(jwk(K2, "k2"))  # the issuer rotates: k1 out, k2 in
    clock.advance(1)
    assert await unknown_key(cache, "k2") == "token_unknown_key"  # cooldown: not fetched
    assert same_key(await cache.key_for("k1", "ES256"), K1)        # old set still served
    assert server.requests == 1

    clock.advance(29)  # 30 s since the last fetch: the cooldown is over
    assert same_key(await cache.key_for("k2", "ES256"), K2)
    assert server.requests == 2
    assert await unknown_key(cache, "k1") == "token_unknown_key"  # gone with the rotation
    assert server.requests == 2

    # Rotation noticed by expiry alone (no unknown kid needed).
    server.document = doc(jwk(K3, "k3"))
    clock.advance(300)
    assert await unknown_key(cache, "k2") == "token_unknown_key"
    assert server.requests == 3
    assert same_key(await cache.key_for("k3", "ES256"), K3)
    assert server.requests == 3


# ------------------------------------------------------------------ outages


@pytest.mark.parametrize("failure", ["500", "down", "not-json", "redirect", "not-jwks"])
async def test_last_good_keys_serve_until_stale_max_then_jwks_unavailable(
        failure: str, server: JwksServer, session: aiohttp.ClientSession,
        clock: Monotonic) -> None:
    cache = make_cache(server, session, clock)
    t0 = clock()
    assert same_key(await cache.key_for("k1", "ES256"), K1)  # fresh_until = t0 + 300

    if failure == "500":
        server.status = 500
    elif failure == "down":
        await server.stop()
    elif failure == "not-json":
        server.raw = b"<html>maintenance</html>"
    elif failure == "redirect":
        server.status = 302
        server.headers = {"Location": "http://127.0.0.1:9/evil-jwks"}
    else:
        server.document = {"keys": {"k1": "not a list"}}

    clock.t = t0 + 300  # expired: refetch fails, stale keys serve
    assert same_key(await cache.key_for("k1", "ES256"), K1)
    clock.t = t0 + 300 + 3600  # the last instant stale keys may serve
    assert same_key(await cache.key_for("k1", "ES256"), K1)
    assert cache.stats.failures == 2

    clock.t = t0 + 300 + 3600 + 0.001
    with pytest.raises(UpstreamUnavailable) as caught:
        await cache.key_for("k1", "ES256")
    assert caught.value.code == "jwks_unavailable"
    assert caught.value.status == 503
    assert server.requests == (1 if failure == "down" else 3)
    assert cache.stats.outcomes == {"success": 1, "failure": 2}


async def test_recovers_when_the_issuer_comes_back(server: JwksServer,
                                                   session: aiohttp.ClientSession,
                                                   clock: Monotonic) -> None:
    cache = make_cache(server, session, clock)
    assert same_key(await cache.key_for("k1", "ES256"), K1)
    server.status = 500
    clock.advance(4000)  # past fresh_until + stale_max
    with pytest.raises(UpstreamUnavailable) as caught:
        await cache.key_for("k1", "ES256")
    assert caught.value.code == "jwks_unavailable"

    server.status = 200
    server.document = doc(jwk(K2, "k2"))
    clock.advance(30)
    assert same_key(await cache.key_for("k2", "ES256"), K2)
    assert server.requests == 3


async def test_first_fetch_failing_is_jwks_unavailable_and_retried_after_cooldown(
        server: JwksServer, session: aiohttp.ClientSession, clock: Monotonic) -> None:
    server.status = 503
    cache = make_cache(server, session, clock)
    for _ in range(3):
        with pytest.raises(UpstreamUnavailable) as caught:
            await cache.key_for("k1", "ES256")
        assert caught.value.code == "jwks_unavailable"
    assert server.requests == 1  # one attempt per cooldown, even when failing
    server.status = 200
    clock.advance(30)
    assert same_key(await cache.key_for("k1", "ES256"), K1)
    assert server.requests == 2


# ------------------------------------------------------------------ what is never cached


@pytest.mark.parametrize(
    "bad",
    [doc(), doc(OCT), doc(private_jwk(K2, "k2")), doc(jwk(K2, "k2", use="enc")),
     doc(jwk(K2, "k2", key_ops=["encrypt"]))],
    ids=["empty", "only-oct", "only-private", "only-enc", "only-key-ops-encrypt"],
)
async def test_key_set_without_usable_keys_is_never_cached(
        bad: dict[str, Any], server: JwksServer, session: aiohttp.ClientSession,
        clock: Monotonic) -> None:
    cache = make_cache(server, session, clock)
    assert same_key(await cache.key_for("k1", "ES256"), K1)

    server.document = bad
    clock.advance(300)
    assert same_key(await cache.key_for("k1", "ES256"), K1)  # old set stays
    assert await unknown_key(cache, "k2") == "token_unknown_key"
    assert server.requests == 2
    assert cache.stats.outcomes == {"success": 1, "failure": 1}

    fresh = make_cache(server, session, Monotonic())
    with pytest.raises(UpstreamUnavailable) as caught:
        await fresh.key_for("k1", "ES256")
    assert caught.value.code == "jwks_unavailable"


def test_parse_jwks_keeps_only_public_signature_keys() -> None:
    ed_priv = ed25519.Ed25519PrivateKey.generate()
    document = doc(
        OCT,
        {"kty": "oct", "kid": "oct-no-alg", "k": "c2VjcmV0"},
        private_jwk(K2, "ec-private"),
        private_jwk(RSA2048, "rsa-private"),
        private_jwk(ed_priv, "okp-private"),
        jwk(K3, "enc", use="enc"),
        jwk(K1, "ec-public", alg="ES256", use="sig"),
        jwk(RSA2048, "rsa-public"),
        jwk(ED, "okp-public", alg="EdDSA"),
        jwk(K2, None),
        "not-an-object",
        {"kty": "EC", "crv": "P-256", "x": "!!", "y": "!!", "kid": "broken"},
        {"kty": "RSA", "kid": "no-modulus", "e": "AQAB"},
        {"kid": "no-kty"},
    )

    keys = parse_jwks(document)

    assert [(k.kid, k.alg) for k in keys] == [("ec-public", "ES256"), ("rsa-public", None),
                                              ("okp-public", "EdDSA"), (None, None)]
    assert same_key(keys[0].key, K1)
    assert same_key(keys[1].key, RSA2048)
    assert keys[2].key.public_bytes_raw() == ED.public_key().public_bytes_raw()
    assert same_key(keys[3].key, K2)


@pytest.mark.parametrize("document", [[], {"keys": {}}, {"nokeys": []}, "keys", None],
                         ids=["list", "keys-object", "no-keys", "string", "null"])
def test_parse_jwks_refuses_what_is_not_a_jwks(document: Any) -> None:
    with pytest.raises(ValueError, match="not a JWKS document"):
        parse_jwks(document)


async def test_hmac_and_private_keys_are_unknown_to_the_cache(
        server: JwksServer, session: aiohttp.ClientSession, clock: Monotonic) -> None:
    server.document = doc(OCT, private_jwk(K2, "leaked"), jwk(K1, "good"))
    cache = make_cache(server, session, clock)
    assert same_key(await cache.key_for("good", "ES256"), K1)
    assert await unknown_key(cache, "hmac", "ES256") == "token_unknown_key"
    assert await unknown_key(cache, "leaked", "ES256") == "token_unknown_key"
    # With the HMAC and private entries ignored, exactly one usable key remains.
    assert same_key(await cache.key_for(None, "ES256"), K1)
    assert server.requests == 1


# ------------------------------------------------------------------ size limit


def _padded(size: int) -> bytes:
    """A valid JWKS (k1 and k9) padded to exactly ``size`` bytes."""
    base = {"keys": [jwk(K1, "k1"), jwk(K2, "k9")], "padding": ""}
    overhead = len(json.dumps(base).encode())
    base["padding"] = "x" * (size - overhead)
    body = json.dumps(base).encode()
    assert len(body) == size
    return body


async def test_response_larger_than_jwks_max_bytes_is_refused(
        server: JwksServer, session: aiohttp.ClientSession, clock: Monotonic) -> None:
    cache = make_cache(server, session, clock, jwks_max_bytes=2048)
    assert same_key(await cache.key_for("k1", "ES256"), K1)

    server.raw = _padded(2049)
    clock.advance(31)
    assert await unknown_key(cache, "k9") == "token_unknown_key"  # not taken
    assert same_key(await cache.key_for("k1", "ES256"), K1)       # old set stays
    assert server.requests == 2
    assert cache.stats.outcomes == {"success": 1, "failure": 1}

    server.raw = _padded(100 * 1024)
    fresh = make_cache(server, session, Monotonic(), jwks_max_bytes=2048)
    with pytest.raises(UpstreamUnavailable) as caught:
        await fresh.key_for("k1", "ES256")
    assert caught.value.code == "jwks_unavailable"


async def test_response_of_exactly_jwks_max_bytes_is_accepted(
        server: JwksServer, session: aiohttp.ClientSession, clock: Monotonic) -> None:
    server.raw = _padded(2048)
    cache = make_cache(server, session, clock, jwks_max_bytes=2048)
    assert same_key(await cache.key_for("k9", "ES256"), K2)


# ------------------------------------------------------------------ Cache-Control


@pytest.mark.parametrize(
    ("cache_control", "fresh_for"),
    [
        (None, 300),
        ("max-age=60", 60),
        ("public, max-age=120, must-revalidate", 120),
        ("max-age=5", MIN_CACHE_SECONDS),
        ("max-age=0", MIN_CACHE_SECONDS),
        ("no-cache, max-age=1", MIN_CACHE_SECONDS),
        ("max-age=100000", 300),  # never longer than jwks_cache_ttl_s
        ("max-age=oops", 300),
    ],
    ids=["none", "60", "120-among-others", "5-floored-to-10", "0-floored-to-10",
         "1-floored-to-10", "capped-at-ttl", "unparsable"],
)
async def test_cache_control_max_age_shortens_freshness_but_not_below_10s(
        cache_control: str | None, fresh_for: int, server: JwksServer,
        session: aiohttp.ClientSession, clock: Monotonic) -> None:
    if cache_control is not None:
        server.headers = {"Cache-Control": cache_control}
    cache = make_cache(server, session, clock, jwks_refresh_cooldown_s=1)
    t0 = clock()
    assert same_key(await cache.key_for("k1", "ES256"), K1)

    clock.t = t0 + fresh_for - 0.5
    assert same_key(await cache.key_for("k1", "ES256"), K1)
    assert server.requests == 1
    clock.t = t0 + fresh_for
    assert same_key(await cache.key_for("k1", "ES256"), K1)
    assert server.requests == 2


# ------------------------------------------------------------------ tokens without kid


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ([jwk(K1, "k1")], K1),
        ([jwk(K1, None)], K1),
        ([jwk(K1, "k1"), jwk(K2, "k2")], None),
        ([jwk(K1, "k1", alg="ES256"), jwk(RSA2048, "r1", alg="RS256")], K1),
        ([jwk(K1, "k1", alg="ES256"), jwk(K2, "k2", alg="ES384")], K1),
        ([jwk(K1, "k1"), OCT], K1),
        ([jwk(K1, "k1"), private_jwk(K2, "k2")], K1),
        ([jwk(K1, "k1"), jwk(RSA2048, "r1")], None),  # both usable for ES256: ambiguous
    ],
    ids=["one-key", "one-key-no-kid", "two-keys", "other-pinned-alg", "other-curve-alg",
         "plus-oct", "plus-private", "two-unpinned-keys"],
)
async def test_token_without_kid_needs_exactly_one_usable_key(
        keys: list[dict[str, Any]], expected: Any, server: JwksServer,
        session: aiohttp.ClientSession, clock: Monotonic) -> None:
    server.document = doc(*keys)
    cache = make_cache(server, session, clock)
    if expected is None:
        assert await unknown_key(cache, None) == "token_unknown_key"
    else:
        assert same_key(await cache.key_for(None, "ES256"), expected)


async def test_duplicate_kids_are_ambiguous(server: JwksServer,
                                            session: aiohttp.ClientSession,
                                            clock: Monotonic) -> None:
    server.document = doc(jwk(K1, "dup"), jwk(K2, "dup"), jwk(K3, "k3"))
    cache = make_cache(server, session, clock)
    assert await unknown_key(cache, "dup") == "token_unknown_key"
    assert same_key(await cache.key_for("k3", "ES256"), K3)


# ------------------------------------------------------------------ the verifier end to end


async def test_identity_verifier_end_to_end(server: JwksServer,
                                            session: aiohttp.ClientSession) -> None:
    server.document = doc(jwk(K1, "k1", alg="ES256"))
    settings = IdentitySettings(audience=AUDIENCE, issuers=(settings_for(server),))
    verifier = IdentityVerifier(settings, session, FixedClock(NOW))

    identity = await verifier.verify(token(claims(sub="pod-9"), key=K1, kid="k1"))
    assert (identity.issuer_name, identity.instance_id, identity.jti) == (
        "k8s", "pod-9", "jti-0001")

    with pytest.raises(TokenInvalid) as caught:
        await verifier.verify(token(claims(iss=ISSUER + "/"), key=K1, kid="k1"))
    assert caught.value.code == "token_unknown_issuer"

    with pytest.raises(TokenInvalid) as caught:
        await verifier.verify(token(claims(), key=K2, kid="k2"))
    assert caught.value.code == "token_unknown_key"

    with pytest.raises(TokenInvalid) as caught:  # right kid, wrong signer
        await verifier.verify(token(claims(), key=K2, kid="k1"))
    assert caught.value.code == "token_bad_signature"
    assert server.requests == 1


# ---------------------------------------- fixed production bugs (regression guards)


async def test_jwks_body_arriving_in_two_chunks_is_read_whole(
        server: JwksServer, session: aiohttp.ClientSession, clock: Monotonic) -> None:
    server.document = doc(jwk(K1, "k1"), jwk(K2, "k2"))
    server.chunk_pause = 0.2
    cache = make_cache(server, session, clock)
    assert same_key(await cache.key_for("k2", "ES256"), K2)


def test_parse_jwks_skips_an_entry_with_alg_none() -> None:
    keys = parse_jwks(doc(jwk(K1, "k1"), jwk(K2, "k2", alg="none")))
    assert [k.kid for k in keys] == ["k1"]


async def test_one_alg_none_entry_does_not_poison_the_key_set(
        server: JwksServer, session: aiohttp.ClientSession, clock: Monotonic) -> None:
    server.document = doc(jwk(K1, "k1"), jwk(K2, "k2", alg="none"))
    cache = make_cache(server, session, clock)
    assert same_key(await cache.key_for("k1", "ES256"), K1)


# ------------------------------------------------------------------ key_ops (RFC 7517 §4.3)


@pytest.mark.parametrize(("extra", "kept"), [
    ({}, True),
    ({"key_ops": ["verify"]}, True),
    ({"key_ops": ["sign", "verify"]}, True),
    ({"key_ops": ["verify"], "use": "sig"}, True),
    ({"key_ops": ["encrypt"]}, False),
    ({"key_ops": ["encrypt", "wrapKey"]}, False),
    ({"key_ops": ["sign"]}, False),
    ({"key_ops": []}, False),
    ({"key_ops": "verify"}, False),
    ({"key_ops": None}, False),
    ({"key_ops": ["VERIFY"]}, False),
    ({"key_ops": ["encrypt"], "use": "sig"}, False),
    ({"key_ops": ["verify"], "use": "enc"}, False),
], ids=["absent", "verify", "sign-and-verify", "verify-and-use-sig", "encrypt",
        "encrypt-wrap", "sign-only", "empty", "a-string", "null", "upper-case",
        "encrypt-despite-use-sig", "verify-despite-use-enc"])
def test_a_key_whose_key_ops_lack_verify_is_never_used(extra: dict[str, Any],
                                                       kept: bool) -> None:
    keys = parse_jwks(doc(jwk(K1, "k1", **extra)))
    assert bool(keys) is kept
    assert (unusable(jwk(K1, "k1", **extra)) is None) is kept


def test_key_ops_applies_to_spiffe_bundles_too() -> None:
    bundle = doc(jwk(K1, "a", use="jwt-svid", key_ops=["encrypt"]),
                 jwk(K2, "b", use="jwt-svid", key_ops=["verify"]))
    assert [k.kid for k in parse_jwks(bundle, use="jwt-svid")] == ["b"]


def test_unusable_says_why() -> None:
    assert unusable(jwk(K1, "k", key_ops=["encrypt"])) == (
        "key_ops ['encrypt'] does not include 'verify'")
    assert unusable(jwk(K1, "k", use="enc")) == "use is 'enc', not 'sig'"
    assert unusable(OCT) == "a symmetric (oct) key"
    assert unusable(private_jwk(K2, "p")) == "it holds a private key"
    assert unusable({"kty": "x" * 100}).startswith("key type 'xxxxx")
    assert len(unusable({"kty": "x" * 100}) or "") < 80
    assert unusable("nope") == "not a JSON object"


def test_why_no_usable_key_lists_each_entry_and_bounds_the_list() -> None:
    assert why_no_usable_key(doc()) == "the key set is empty"
    document = doc(jwk(K1, "a", key_ops=["encrypt"]), jwk(K2, None, use="enc"),
                   jwk(K3, "c", alg="none"))
    assert why_no_usable_key(document) == (
        "3 key(s), none usable: kid 'a': key_ops ['encrypt'] does not include 'verify'; "
        "key 1: use is 'enc', not 'sig'; kid 'c': does not load as a public key")
    many = doc(*[jwk(K1, f"k{i}", use="enc") for i in range(8)])
    assert why_no_usable_key(many, at_most=2).endswith("; and 6 more")


async def test_a_set_with_no_usable_key_is_reported_as_configuration(
        server: JwksServer, session: aiohttp.ClientSession, clock: Monotonic,
        caplog: pytest.LogCaptureFixture) -> None:
    server.document = doc(jwk(K1, "k1", key_ops=["encrypt"]))
    cache = make_cache(server, session, clock)
    with pytest.raises(UpstreamUnavailable) as caught:
        await cache.key_for("k1", "ES256")
    assert caught.value.code == "jwks_unavailable"
    assert "holds no usable signing key" in caught.value.message
    assert "configuration" in caught.value.message
    (record,) = [r for r in caplog.records if "no usable signing key" in r.getMessage()]
    assert "configuration" in record.getMessage()
    assert "key_ops ['encrypt']" in record.__dict__["keys"]

    server.document = doc(jwk(K1, "k1"))  # the issuer is fixed: the next fetch serves
    clock.advance(30)
    assert same_key(await cache.key_for("k1", "ES256"), K1)

    server.status = 503  # and a later outage says so, not "no usable key"
    fresh = make_cache(server, session, Monotonic())
    with pytest.raises(UpstreamUnavailable) as caught:
        await fresh.key_for("k1", "ES256")
    assert "cannot be fetched" in caught.value.message
