"""Token attacks sent to a running broker over HTTP. Each is refused with 401 and its exact
error code, and neither the lease store nor Vault changes.

The broker trusts three issuers:

- ``dev``: the session's dev issuer. Its JWKS pins ``alg: ES256`` on its only key and the
  issuer accepts ES256 only.
- ``other``: a second dev issuer (another key, another kid), as in test_issuer_scoping.py.
- ``lab``: an issuer whose JWKS entry names no ``alg`` and which accepts ES256 *and* RS256,
  so that a key/algorithm confusion gets as far as the key-type check. Its JWKS also
  publishes keys that are not for verifying signatures (``key_ops: ["encrypt"]``,
  ``use: enc``), whose private halves the attacker holds.
- ``sealed``: an issuer whose JWKS holds only such keys: no usable key at all.

Every token below is otherwise valid and signed by the real key unless the attack says
otherwise; ``test_genuine_tokens_of_each_issuer_are_accepted`` proves the baseline.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from broker.dev.issuer import DevIssuer
from tests.harness.ports import held_socket, port_of, serve_app
from tests.unit.identity.tokenkit import RSA2048, b64, seg, sign_input

LAB_ISS = "https://lab.example.org"
LAB_KEY = ec.generate_private_key(ec.SECP256R1())
LAB_KID = "lab-ec"
# Published for another purpose than verifying signatures (RFC 7517 §4.2, §4.3): a token
# signed with one of them must never verify, whoever holds the private half.
ENC_KEY = ec.generate_private_key(ec.SECP256R1())
ENC_OPS_KID, ENC_USE_KID, BAD_OPS_KID = "lab-key-ops-encrypt", "lab-use-enc", "lab-key-ops-text"
SEALED_ISS = "https://sealed.example.org"
CYRILLIC_A = "\u0430"  # looks like Latin 'a'


@dataclass
class Env:
    dev: DevIssuer
    other: DevIssuer
    lab_jwks_uri: str


@pytest.fixture(scope="module")
async def lab_env(issuer: DevIssuer) -> AsyncIterator[Env]:
    sock = held_socket()
    port = port_of(sock)
    other = DevIssuer.generate(f"http://127.0.0.1:{port}")
    lab_jwk = json.loads(ECAlgorithm.to_jwk(LAB_KEY.public_key()))
    lab_jwk.pop("key_ops", None)
    lab_jwk["kid"] = LAB_KID  # no "alg": any algorithm the issuer accepts may select it
    enc_jwk = json.loads(ECAlgorithm.to_jwk(ENC_KEY.public_key()))
    enc_jwk.pop("key_ops", None)
    not_for_signatures = [
        {**enc_jwk, "kid": ENC_OPS_KID, "key_ops": ["encrypt"]},
        {**enc_jwk, "kid": ENC_USE_KID, "use": "enc"},
        {**enc_jwk, "kid": BAD_OPS_KID, "key_ops": "verify"},  # must be a list
    ]
    for entry in not_for_signatures:
        entry.pop("alg", None)

    async def other_jwks(_: web.Request) -> web.Response:
        return web.json_response(other.jwks())

    async def lab_jwks(_: web.Request) -> web.Response:
        return web.json_response({"keys": [lab_jwk, *not_for_signatures]})

    async def sealed_jwks(_: web.Request) -> web.Response:
        return web.json_response({"keys": not_for_signatures})

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", other_jwks)
    app.router.add_get("/lab/jwks", lab_jwks)
    app.router.add_get("/sealed/jwks", sealed_jwks)
    runner, _ = await serve_app(app, sock, access_log=None)
    yield Env(dev=issuer, other=other, lab_jwks_uri=f"http://127.0.0.1:{port}/lab/jwks")
    await runner.cleanup()


def _issuer_entry(name: str, iss: str, jwks_uri: str, algorithms: list[str]) -> dict[str, Any]:
    return {"name": name, "issuer": iss, "jwks_uri": jwks_uri, "algorithms": algorithms,
            "instance_claim": "instance_id", "workload_claim": "workload",
            "max_token_lifetime": "1h", "replay": "off", "jwks_refresh_cooldown_s": 5}


@pytest.fixture
async def atk(make_broker, lab_env: Env):
    dev, other = lab_env.dev, lab_env.other
    return await make_broker(overrides={
        "identity": {"audience": dev.audience, "issuers": [
            _issuer_entry("dev", dev.issuer, f"{dev.issuer}/.well-known/jwks.json", ["ES256"]),
            _issuer_entry("other", other.issuer, f"{other.issuer}/.well-known/jwks.json",
                          ["ES256"]),
            _issuer_entry("lab", LAB_ISS, lab_env.lab_jwks_uri, ["ES256", "RS256"]),
            _issuer_entry("sealed", SEALED_ISS,
                          lab_env.lab_jwks_uri.replace("/lab/", "/sealed/"), ["ES256"]),
        ]},
        "policy": {"rules": [{"name": f"all-{i}", "issuer": i, "allow": ["dev-cert"]}
                             for i in ("dev", "other", "lab", "sealed")]},
    })


# ------------------------------------------------------------------ token builders


def claims(iss: str, audience: str, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    c = {"iss": iss, "aud": audience, "sub": "payments", "instance_id": "i-atk-" +
         secrets.token_hex(3), "workload": "payments", "iat": now, "nbf": now, "exp": now + 300,
         "jti": secrets.token_hex(8)}
    c.update(over)
    return c


def signed(header: Any, payload: Any, key: Any, alg: str) -> str:
    """Sign by hand; ``header``/``payload`` may be raw bytes (taken verbatim)."""
    signing_input = f"{seg(header)}.{seg(payload)}"
    return f"{signing_input}.{sign_input(signing_input, key, alg)}"


def dev_token(env: Env, *, header: dict[str, Any] | None = None, **over: Any) -> str:
    head = {"alg": "ES256", "typ": "JWT", "kid": env.dev.kid, **(header or {})}
    return signed(head, claims(env.dev.issuer, env.dev.audience, **over), env.dev.key, "ES256")


def lab_token(env: Env, *, payload: Any = None, **over: Any) -> str:
    if payload is None:
        payload = claims(LAB_ISS, env.dev.audience, **over)
    return signed({"alg": "ES256", "typ": "JWT", "kid": LAB_KID}, payload, LAB_KEY, "ES256")


def enc_key_token(env: Env, kid: str, iss: str = LAB_ISS) -> str:
    """Signed with the private half of a key the issuer published for another use."""
    return signed({"alg": "ES256", "typ": "JWT", "kid": kid}, claims(iss, env.dev.audience),
                  ENC_KEY, "ES256")


def rs256_with_ec_kid(env: Env, iss: str, kid: str) -> str:
    return signed({"alg": "RS256", "typ": "JWT", "kid": kid},
                  claims(iss, env.dev.audience), RSA2048, "RS256")


def other_key_with_dev_iss(env: Env) -> str:
    # Issuer B's real key and kid, but A's iss: A's key set is the only one consulted.
    return signed({"alg": "ES256", "typ": "JWT", "kid": env.other.kid},
                  claims(env.dev.issuer, env.dev.audience), env.other.key, "ES256")


def zero_signature(env: Env) -> str:
    # r = s = 0 ("psychic signature", CVE-2022-21449 in Java): must never verify.
    head = seg({"alg": "ES256", "typ": "JWT", "kid": env.dev.kid})
    return f"{head}.{seg(claims(env.dev.issuer, env.dev.audience))}.{b64(bytes(64))}"


def with_duplicate(payload: dict[str, Any], name: str, value: Any) -> bytes:
    text = json.dumps(payload, separators=(",", ":"))
    return (text[:-1] + f",{json.dumps(name)}:{json.dumps(value)}}}").encode()


def duplicate_instance(env: Env) -> str:
    payload = with_duplicate(claims(env.dev.issuer, env.dev.audience), "instance_id",
                             "i-victim")
    return signed({"alg": "ES256", "typ": "JWT", "kid": env.dev.kid}, payload, env.dev.key,
                  "ES256")


def duplicate_iss(env: Env) -> str:
    # First iss picks the lab issuer, the last one (what most parsers keep) names dev.
    payload = with_duplicate(claims(LAB_ISS, env.dev.audience), "iss", env.dev.issuer)
    return lab_token(env, payload=payload)


def duplicate_header_alg(env: Env) -> str:
    header = f'{{"alg":"ES256","kid":"{env.dev.kid}","alg":"none"}}'.encode()
    return signed(header, claims(env.dev.issuer, env.dev.audience), env.dev.key, "ES256")


def confusable(env: Env, *, escaped: bool) -> str:
    iss = LAB_ISS.replace("example", f"ex{CYRILLIC_A}mple")
    assert iss != LAB_ISS and iss.replace(CYRILLIC_A, "a") == LAB_ISS
    payload = claims(iss, env.dev.audience)
    raw = json.dumps(payload, ensure_ascii=escaped, separators=(",", ":")).encode("utf-8")
    assert (b"\\u0430" in raw) == escaped
    return lab_token(env, payload=raw)


def nested(env: Env) -> str:
    inner = lab_token(env)
    return signed({"alg": "ES256", "typ": "JWT", "kid": env.dev.kid, "cty": "JWT"},
                  inner.encode(), env.dev.key, "ES256")


def jwe(env: Env) -> str:
    header = {"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": env.dev.kid}
    return ".".join([seg(header), b64(os.urandom(256)), b64(os.urandom(12)),
                     b64(os.urandom(180)), b64(os.urandom(16))])


def long_lived(env: Env) -> str:
    now = int(time.time())
    return dev_token(env, iat=now, nbf=now, exp=now + 7200)


JKU = "http://127.0.0.1:9/attacker-jwks.json"
CASES: list[tuple[str, Callable[[Env], str], str]] = [
    # The dev JWKS pins alg ES256 on its only key, so for RS256 the key set has no
    # candidate at all: the kid does not even resolve.
    ("rs256-with-dev-ec-kid", lambda e: rs256_with_ec_kid(e, e.dev.issuer, e.dev.kid),
     "token_unknown_key"),
    # The lab JWKS names no alg and the lab issuer accepts RS256: the EC key is found, then
    # refused for not being an RSA key before any signature math (never token_bad_signature).
    ("rs256-with-lab-ec-kid", lambda e: rs256_with_ec_kid(e, LAB_ISS, LAB_KID),
     "token_key_mismatch"),
    ("kid-of-another-issuer", other_key_with_dev_iss, "token_unknown_key"),
    # Keys the issuer published, but not for verifying signatures: never candidates.
    ("key-with-key-ops-encrypt", lambda e: enc_key_token(e, ENC_OPS_KID), "token_unknown_key"),
    ("key-with-use-enc", lambda e: enc_key_token(e, ENC_USE_KID), "token_unknown_key"),
    ("key-with-key-ops-not-a-list", lambda e: enc_key_token(e, BAD_OPS_KID),
     "token_unknown_key"),
    ("ecdsa-zero-signature", zero_signature, "token_bad_signature"),
    ("duplicate-claim-instance-id", duplicate_instance, "token_malformed"),
    ("duplicate-claim-iss", duplicate_iss, "token_malformed"),
    ("duplicate-header-alg", duplicate_header_alg, "token_malformed"),
    ("confusable-issuer-escaped", lambda e: confusable(e, escaped=True),
     "token_unknown_issuer"),
    ("confusable-issuer-utf8", lambda e: confusable(e, escaped=False), "token_unknown_issuer"),
    ("header-jku", lambda e: dev_token(e, header={"jku": JKU}), "token_header_refused"),
    ("header-x5u", lambda e: dev_token(e, header={"x5u": "http://127.0.0.1:9/cert.pem"}),
     "token_header_refused"),
    ("header-x5c", lambda e: dev_token(e, header={"x5c": [b64(os.urandom(300))]}),
     "token_header_refused"),
    ("header-crit", lambda e: dev_token(e, header={"crit": ["urn:lab:policy"],
                                                   "urn:lab:policy": "x"}),
     "token_header_refused"),
    ("nested-cty-jwt", nested, "token_header_refused"),
    ("jwe-five-parts", jwe, "token_encrypted"),
    ("lifetime-over-max", long_lived, "token_lifetime_too_long"),
    ("aud-array-without-broker",
     lambda e: dev_token(e, aud=["https://vault.example", "other-service"]),
     "token_wrong_audience"),
]


async def _post(http, b, token: str) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-cert"},
                         headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


@pytest.mark.parametrize(("build", "code"), [(b, c) for _, b, c in CASES],
                         ids=[name for name, _, _ in CASES])
async def test_attack_is_refused_and_changes_nothing(build, code, atk, lab_env, http, vault):
    token = build(lab_env)
    before = (atk.store_snapshot(), vault.snapshot())

    status, body = await _post(http, atk, token)

    assert (status, body["error"]["code"]) == (401, code), body
    assert set(body) == {"error"} and body["error"]["message"]
    assert (atk.store_snapshot(), vault.snapshot()) == before


async def test_genuine_tokens_of_each_issuer_are_accepted(atk, lab_env, http):
    """The baseline: without the attack, each issuer's token gets a credential."""
    e = lab_env
    genuine = [
        dev_token(e),
        signed({"alg": "ES256", "typ": "JWT", "kid": e.other.kid},
               claims(e.other.issuer, e.dev.audience), e.other.key, "ES256"),
        lab_token(e),
    ]
    for token in genuine:
        status, body = await _post(http, atk, token)
        assert status == 201, body
    assert len(atk.rows("leases")) == 3


async def test_an_issuer_with_no_key_for_signatures_is_a_configuration_problem(
        atk, lab_env, http):
    """An issuer whose key set holds only keys for other uses verifies nothing, even a
    token signed with one of those keys, and the refusal says it is the issuer's key set
    (configuration), not the token or the network."""
    before = atk.store_snapshot()
    async with http.post(f"{atk.url}/v1/credentials", json={"role": "dev-cert"},
                         headers={"Authorization":
                                  f"Bearer {enc_key_token(lab_env, ENC_OPS_KID, SEALED_ISS)}"}
                         ) as resp:
        status, body = resp.status, await resp.json()
    assert (status, body["error"]["code"]) == (503, "jwks_unavailable"), body
    assert "holds no usable signing key" in body["error"]["message"]
    assert "configuration" in body["error"]["message"]
    assert atk.store_snapshot() == before
