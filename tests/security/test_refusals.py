"""Every refused request: the right status, a stable error code, and nothing changed in
the lease store or in Vault."""

from __future__ import annotations

import base64
import json
import logging
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.app.http_refusals import header_limit
from broker.logs import JsonFormatter
from tests.harness.api import terminate


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _raw(header: dict, payload: dict, sig: bytes = b"") -> str:
    return ".".join([_b64(json.dumps(header).encode()), _b64(json.dumps(payload).encode()),
                     _b64(sig)])


def _claims(issuer, **over):
    now = int(time.time())
    c = {"iss": issuer.issuer, "aud": issuer.audience, "sub": "payments",
         "instance_id": "i-sec", "workload": "payments", "iat": now, "nbf": now,
         "exp": now + 300}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def _signed(issuer, key=None, headers=None, **over) -> str:
    return jwt.encode(_claims(issuer, **over), key or issuer.key, algorithm="ES256",
                      headers={"kid": issuer.kid, **(headers or {})})


def _token_cases(issuer):
    pub_pem = issuer.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    other_key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    hs = jwt.api_jws.PyJWS()
    hs_token = None
    try:
        hs_token = hs.encode(json.dumps(_claims(issuer)).encode(), pub_pem, algorithm="HS256",
                             headers={"kid": issuer.kid})
    except jwt.InvalidKeyError:  # PyJWT refuses to HMAC with a PEM: forge it by hand
        import hashlib
        import hmac
        head = _b64(json.dumps({"alg": "HS256", "kid": issuer.kid}).encode())
        body = _b64(json.dumps(_claims(issuer)).encode())
        sig = hmac.new(pub_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
        hs_token = f"{head}.{body}.{_b64(sig)}"
    return [
        ("expired", _signed(issuer, iat=now - 900, nbf=now - 900, exp=now - 600), "token_expired"),
        ("not_yet_valid", _signed(issuer, nbf=now + 600), "token_not_yet_valid"),
        ("wrong_audience", _signed(issuer, aud="someone-else"), "token_wrong_audience"),
        ("audience_array_without_broker", _signed(issuer, aud=["a", "b"]),
         "token_wrong_audience"),
        ("wrong_issuer_trailing_slash", _signed(issuer, iss=issuer.issuer + "/"),
         "token_unknown_issuer"),
        ("bad_signature", _signed(issuer, key=other_key), "token_bad_signature"),
        ("alg_none", _raw({"alg": "none", "kid": issuer.kid}, _claims(issuer)),
         "token_algorithm_refused"),
        ("alg_none_with_signature", _raw({"alg": "none", "kid": issuer.kid}, _claims(issuer),
                                         sig=b"\x01" * 64), "token_algorithm_refused"),
        ("alg_None_capitalised", _raw({"alg": "None", "kid": issuer.kid}, _claims(issuer),
                                      sig=b"\x01" * 64), "token_algorithm_refused"),
        ("non_json_payload", ".".join([_b64(json.dumps({"alg": "ES256", "kid": issuer.kid})
                                            .encode()), _b64(b"not json at all"),
                                       _b64(b"\x01" * 64)]), "token_malformed"),
        ("hs256_with_public_key", hs_token, "token_algorithm_refused"),
        ("embedded_jwk", _signed(issuer, headers={"jwk": {"kty": "EC"}}), "token_header_refused"),
        ("missing_instance_claim", _signed(issuer, instance_id=None), "token_missing_claim"),
        ("missing_exp", _signed(issuer, exp=None), "token_missing_claim"),
        ("unknown_kid", jwt.encode(_claims(issuer), issuer.key, algorithm="ES256",
                                   headers={"kid": "nope"}), "token_unknown_key"),
        ("lifetime_too_long", _signed(issuer, exp=now + 7200), "token_lifetime_too_long"),
        ("oversized", "e" * 20_000, "token_too_large"),
        ("garbage", "not-a-jwt", "token_malformed"),
    ]


@pytest.fixture
async def sec(make_broker):
    return await make_broker()


async def _assert_refused(http, b, vault, method, path, *, status, code, headers=None,
                          data=None, json_body=None, audited=0):
    """Refused with ``status`` and ``code``, and nothing changed but ``audited`` new audit
    events (a refused admin call is audited: admin.refused)."""
    store_before, vault_before = b.store_snapshot(), vault.snapshot()
    async with http.request(method, f"{b.url}{path}", headers=headers or {}, data=data,
                            json=json_body) as resp:
        body = await resp.json()
        assert resp.content_type == "application/json"
    assert (resp.status, body["error"]["code"]) == (status, code), body
    assert set(body) == {"error"} and body["error"]["message"]
    store_after = b.store_snapshot()
    assert store_after["audit_events"] == store_before["audit_events"] + audited
    assert {**store_after, "audit_events": 0} == {**store_before, "audit_events": 0}
    assert vault.snapshot() == vault_before
    return body


async def test_each_forged_or_invalid_token_is_refused_and_changes_nothing(sec, http, vault,
                                                                           issuer):
    for name, token, code in _token_cases(issuer):
        body = await _assert_refused(http, sec, vault, "POST", "/v1/credentials",
                                     status=401, code=code,
                                     headers={"Authorization": f"Bearer {token}"},
                                     json_body={"role": "dev-cert"})
        assert token[:40] not in body["error"]["message"], name


@pytest.mark.parametrize("size,status,code", [
    (16 * 1024, 401, "token_malformed"),  # the largest size the verifier looks into
    (16 * 1024 + 1, 401, "token_too_large"),
    (header_limit(16 * 1024) - len("Authorization") - len("Bearer "), 401, "token_too_large"),
    (header_limit(16 * 1024), 431, "header_too_large"),
], ids=["at_max_token_bytes", "past_max_token_bytes", "at_header_limit", "past_header_limit"])
async def test_an_over_long_token_is_refused_in_json_at_either_limit(sec, http, vault, size,
                                                                      status, code):
    """The HTTP server's header limit is sized from max_token_bytes (16 KiB here): every
    token up to it reaches the verifier, a longer one up to the header limit is the
    verifier's token_too_large, and a header past the limit is refused by the server in
    the same JSON shape (not aiohttp's plain-text 400). Nothing changes either way."""
    body = await _assert_refused(http, sec, vault, "POST", "/v1/credentials", status=status,
                                 code=code, headers={"Authorization": f"Bearer {'e' * size}"})
    assert "eeee" not in body["error"]["message"]


@pytest.mark.parametrize("headers,code", [
    ({}, "token_missing"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "token_missing"),
    ({"Authorization": "Bearer "}, "token_missing"),
], ids=["no_header", "basic_auth", "empty_bearer"])
async def test_missing_identity_token(sec, http, vault, headers, code):
    await _assert_refused(http, sec, vault, "POST", "/v1/credentials", status=401, code=code,
                          headers=headers, json_body={"role": "dev-cert"})


@pytest.mark.parametrize("body,status,code", [
    (b"{not json", 400, "malformed_json"),
    (b"[1, 2]", 400, "malformed_json"),
    (b'{"role": "dev-cert", "common_name": "evil.example.com"}', 400, "unknown_parameter"),
    (b'{"ttl": "5m"}', 400, "invalid_role"),
    (b'{"role": "../sys/raw"}', 400, "invalid_role"),
    (b'{"role": "dev-cert", "ttl": "5 minutes"}', 400, "invalid_ttl"),
    (b'{"role": "dev-cert", "ttl": 0}', 400, "invalid_ttl"),
    (b'{"role": "dev-cert", "ttl": true}', 400, "invalid_ttl"),
    (b'{"role": "no-such-role"}', 403, "role_not_permitted"),
    (b'{"role": "dev-cert", "pad": "' + b"x" * 70_000 + b'"}', 413, "payload_too_large"),
], ids=["malformed_json", "not_an_object", "unknown_field_passthrough", "missing_role",
        "role_path_traversal", "bad_ttl", "zero_ttl", "bool_ttl", "unknown_role",
        "oversized_body"])
async def test_bad_request_bodies(sec, http, vault, body, status, code):
    await _assert_refused(http, sec, vault, "POST", "/v1/credentials", status=status, code=code,
                          headers={"Authorization": f"Bearer {sec.token('i-body')}",
                                   "Content-Type": "application/json"}, data=body)


async def test_role_not_permitted_for_this_identity(sec, http, vault):
    token = sec.token("i-upper", workload="Not_Allowed")
    await _assert_refused(http, sec, vault, "POST", "/v1/credentials", status=403,
                          code="role_not_permitted",
                          headers={"Authorization": f"Bearer {token}"},
                          json_body={"role": "dev-cert"})


async def test_terminated_instance_is_refused_and_nothing_is_minted(sec, http, vault):
    await terminate(http, sec, "i-dead")
    await _assert_refused(http, sec, vault, "POST", "/v1/credentials", status=409,
                          code="instance_terminated",
                          headers={"Authorization": f"Bearer {sec.token('i-dead')}"},
                          json_body={"role": "dev-db"})


@pytest.mark.parametrize("method,path", [
    ("POST", "/v1/instances/i-x/terminate"),
    ("GET", "/v1/instances/i-x"),
    ("GET", "/v1/admin/leases"),
    ("GET", "/v1/admin/jobs"),
], ids=["terminate", "show_instance", "list_leases", "list_jobs"])
@pytest.mark.parametrize("auth,status,code", [
    (None, 401, "admin_token_missing"),
    ("Bearer wrong-token", 403, "admin_forbidden"),
    ("workload-jwt", 403, "admin_forbidden"),
], ids=["no_token", "wrong_token", "workload_token"])
async def test_admin_calls_need_the_admin_token(sec, http, vault, method, path, auth, status,
                                                code):
    headers = {}
    if auth == "workload-jwt":
        headers["Authorization"] = f"Bearer {sec.token('i-x')}"
    elif auth:
        headers["Authorization"] = auth
    await _assert_refused(http, sec, vault, method, path, status=status, code=code,
                          headers=headers, audited=1)


async def test_bad_path_parameters(sec, http, vault):
    await _assert_refused(http, sec, vault, "POST", "/v1/instances/bad%20id/terminate",
                          status=400, code="invalid_instance_id", headers=sec.admin())
    token = {"Authorization": f"Bearer {sec.token('i-p')}"}
    await _assert_refused(http, sec, vault, "POST", "/v1/leases/..%2fsys/renew", status=404,
                          code="lease_not_found", headers=token)
    await _assert_refused(http, sec, vault, "DELETE", "/v1/leases/l-" + "0" * 32, status=404,
                          code="lease_not_found", headers=token)
    await _assert_refused(http, sec, vault, "GET", "/v1/nothing-here", status=404,
                          code="not_found")


async def test_no_token_or_credential_reaches_a_log_line(sec, http, caplog):
    caplog.set_level(logging.DEBUG)
    token = sec.token("i-logs")
    async with http.post(f"{sec.url}/v1/credentials", headers={"Authorization": f"Bearer {token}"},
                         json={"role": "dev-db"}) as resp:
        cred = await resp.json()
    assert resp.status == 201
    async with http.post(f"{sec.url}/v1/credentials",
                         headers={"Authorization": f"Bearer {token}x"},
                         json={"role": "dev-db"}) as resp:
        assert resp.status == 401
    await terminate(http, sec, "i-logs")
    fmt = JsonFormatter()
    text = "\n".join(fmt.format(r) for r in caplog.records)
    assert caplog.records, "expected the broker to log something"
    secrets = (token, token.split(".")[2], cred["data"]["password"],
               sec.admin()["Authorization"].split()[1],
               sec.settings.vault.auth.token.get_secret_value())
    for secret in secrets:
        assert secret not in text
