"""Attacks on the admin API's operators: a forged, expired or wrong-audience operator JWT,
an unsigned one, a workload's token presented as an admin token, and a read operator on
every endpoint that changes something. Each is refused, audited, and changes nothing but
the audit."""

from __future__ import annotations

import time
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from broker.dev.issuer import DevIssuer
from tests.conftest import ADMIN_TOKEN
from tests.harness.api import bearer, issue
from tests.integration.test_operators_locks import (  # noqa: F401 — the fixture
    READER,
    admin_section,
    events,
    operator_jwt,
    ops_issuer,
)
from tests.unit.identity.tokenkit import b64, seg


@pytest.fixture
async def guarded(make_broker, ops_issuer: DevIssuer):  # noqa: F811
    return await make_broker(store="sqlite", overrides={"admin": admin_section(ops_issuer)})


def forged(ops: DevIssuer) -> str:
    """The issuer's iss and kid, signed by another key."""
    impostor = DevIssuer(ec.generate_private_key(ec.SECP256R1()), ops.kid, ops.issuer,
                         ops.audience)
    return operator_jwt(impostor, "mallory@example.org", ["sec-oncall"])


def unsigned(ops: DevIssuer) -> str:
    now = int(time.time())
    claims = {"iss": ops.issuer, "aud": ops.audience, "sub": "m", "email": "m@example.org",
              "groups": ["sec-oncall"], "iat": now, "exp": now + 60}
    return f"{seg({'alg': 'none', 'typ': 'JWT'})}.{seg(claims)}."


ATTACKS = {
    "forged signature": (forged, "operator_token_invalid"),
    "expired": (lambda ops: operator_jwt(ops, "c@example.org", ["sec-oncall"], ttl=60,
                                         now=time.time() - 3600), "operator_token_invalid"),
    "wrong audience": (lambda ops: DevIssuer(ops.key, ops.kid, ops.issuer, "ephemeral-broker")
                       .mint(instance="-", workload="op",
                             claims={"email": "c@example.org", "groups": ["sec-oncall"]}),
                       "operator_token_invalid"),
    "alg none": (unsigned, "operator_token_invalid"),
    "too long-lived": (lambda ops: operator_jwt(ops, "c@example.org", ["sec-oncall"],
                                                ttl=86400), "operator_token_invalid"),
    "names a static operator": (lambda ops: operator_jwt(ops, "admin", ["sec-oncall"]),
                                "operator_token_invalid"),
    "names a static operator in capitals": (
        lambda ops: operator_jwt(ops, "ADMIN", ["sec-oncall"]), "operator_token_invalid"),
    "unverified email": (lambda ops: ops.mint(instance="-", workload="op", claims={
        "email": "c@example.org", "groups": ["sec-oncall"]}), "operator_token_invalid"),
    "email claimed false": (lambda ops: ops.mint(instance="-", workload="op", claims={
        "email": "c@example.org", "email_verified": False, "groups": ["sec-oncall"]}),
        "operator_token_invalid"),
    "zero signature": (lambda ops: operator_jwt(ops, "c@example.org", ["sec-oncall"])
                       .rsplit(".", 1)[0] + "." + b64(bytes(64)), "operator_token_invalid"),
}


@pytest.mark.parametrize("attack", list(ATTACKS), ids=list(ATTACKS))
async def test_a_bad_operator_jwt_is_refused_and_audited(guarded, http, ops_issuer,  # noqa: F811
                                                          attack):
    make, code = ATTACKS[attack]
    token = make(ops_issuer)
    before = guarded.store_snapshot()
    async with http.post(f"{guarded.url}/v1/admin/locks", headers=bearer(token),
                         json={"kind": "role", "value": "dev-cert", "reason": "x"}) as resp:
        body = await resp.json()
        assert (resp.status, body["error"]["code"]) == (401, code)
    [refusal] = events(guarded, "admin.refused")
    assert refusal["actor"] == "unknown" and refusal["detail"]["token_fingerprint"]
    assert token not in str(guarded.rows("audit_events"))
    after = guarded.store_snapshot()
    assert after["audit_events"] == before["audit_events"] + 1
    assert guarded.rows("locks") == []


async def test_a_workload_token_is_not_an_admin_token(make_broker, http):
    b = await make_broker(store="sqlite")  # no operator issuer configured at all
    workload = b.token("i-atk-adm")
    async with http.get(f"{b.url}/v1/admin/whoami", headers=bearer(workload)) as resp:
        assert (resp.status, (await resp.json())["error"]["code"]) == (403, "admin_forbidden")


def revoke_calls(instance: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    return [
        ("POST", f"/v1/instances/{instance}/terminate", {"reason": "x"}),
        ("POST", "/v1/admin/locks", {"kind": "role", "value": "dev-cert", "reason": "x"}),
        ("DELETE", f"/v1/admin/locks/k-{'0' * 32}", None),
        ("POST", f"/v1/admin/jobs/j-{'0' * 32}/retry", None),
        ("POST", "/v1/admin/reconcile", None),
        ("POST", f"/v1/admin/leases/l-{'0' * 32}/resolve", {"reason": "x"}),
    ]


async def test_a_read_operator_changes_nothing(guarded, http):
    status, _ = await issue(http, guarded, "i-atk-read", "dev-cert")
    assert status == 201
    before = guarded.store_snapshot()
    for method, path, body in revoke_calls("i-atk-read"):
        async with http.request(method, guarded.url + path, headers=bearer(READER),
                                json=body) as resp:
            answer = await resp.json()
            assert (resp.status, answer["error"]["code"]) == (
                403, "operator_scope_insufficient"), path
    refused = events(guarded, "admin.refused")
    assert len(refused) == 6 and {e["actor"] for e in refused} == {"operator:reader"}
    after = guarded.store_snapshot()
    assert after["audit_events"] == before["audit_events"] + 6
    assert {k: v for k, v in after.items() if k != "audit_events"} == \
        {k: v for k, v in before.items() if k != "audit_events"}
    # The static admin token still does all of it.
    async with http.post(f"{guarded.url}/v1/instances/i-atk-read/terminate",
                         headers=bearer(ADMIN_TOKEN)) as resp:
        assert resp.status == 202


async def test_the_large_audit_verify_body_is_read_only_after_the_operator_is_known(
        make_broker, http):
    """``POST /v1/admin/audit/verify`` takes up to 4 MiB of collected checkpoints: a caller
    without an operator's token is refused before any of that body is read or parsed."""
    b = await make_broker(store="sqlite")
    big = b"{" + b"x" * (1 << 20)  # 1 MiB, not JSON: a read body would be 400 malformed_json
    headers = {"Content-Type": "application/json"}
    for auth in ({}, bearer("not-a-token"), bearer(b.token("i-atk-verify"))):
        async with http.post(f"{b.url}/v1/admin/audit/verify", data=big,
                             headers={**headers, **auth}) as resp:
            code = (await resp.json())["error"]["code"]
            assert resp.status in (401, 403) and code != "malformed_json", (resp.status, code)
