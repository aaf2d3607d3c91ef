"""Policy explain: what a token would get, and why, with nothing issued or recorded."""

from __future__ import annotations

import asyncio
import os
import sys
import time

from tests.security.test_replay import identity_cfg


async def _explain(http, b, token, role, **extra):
    async with http.post(f"{b.url}/v1/admin/policy/explain", headers=b.admin(),
                         json={"token": token, "role": role, **extra}) as resp:
        return resp.status, await resp.json()


async def test_explain_grants_refuses_and_reports_token_errors(make_broker, http, issuer, vault):
    b = await make_broker(overrides={"identity": identity_cfg(issuer, "jti_once")})
    token = issuer.mint(instance="i-explain", workload="payments")
    before = (b.store_snapshot(), vault.snapshot())

    status, body = await _explain(http, b, token, "dev-cert", ttl="2h")
    assert status == 200
    assert body["token"] == {"valid": True, "issuer": "dev", "error": None}
    assert body["identity"]["instance_id"] == "i-explain"
    assert body["identity"]["workload"] == "payments"
    assert body["decision"] == {
        "role": "dev-cert", "allowed": True, "rule": "dev-workloads",
        "reason": "rule 'dev-workloads' allows role 'dev-cert' (ttl capped at 3600s)",
        "ttl": 3600, "rules_applying": ["dev-workloads"],
        "params": {"common_name": "payments.workload.internal"}, "code": None,
    }
    assert (body["verdict"], body["refusals"], body["instance"]) == (
        "granted", [], {"state": "never_seen"})

    upper = issuer.mint(instance="i-explain", workload="Payments_X")
    status, body = await _explain(http, b, upper, "dev-cert")
    assert body["decision"]["allowed"] is False and body["decision"]["rules_applying"] == []
    assert body["decision"]["reason"] == "no rule applies to this identity (deny by default)"
    assert (body["verdict"], body["refusals"]) == ("refused", [{
        "code": "role_not_permitted",
        "message": "no rule applies to this identity (deny by default)"}])

    old = issuer.mint(instance="i-explain", workload="payments", now=time.time() - 3600, ttl=60)
    status, body = await _explain(http, b, old, "dev-cert")
    assert status == 200 and body["identity"] is None and body["decision"] is None
    assert body["token"]["valid"] is False and body["token"]["issuer"] == "dev"
    assert body["token"]["error"]["code"] == "token_expired"
    assert (body["verdict"], body["refusals"]) == ("refused", [body["token"]["error"]])

    status, body = await _explain(http, b, "not-a-token", "dev-cert")
    assert body["token"]["error"]["code"] == "token_malformed"
    assert body["token"]["issuer"] is None

    # Nothing was recorded and the token's jti is still good for its exchange.
    assert (b.store_snapshot(), vault.snapshot()) == before
    async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-cert"},
                         headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 201


async def test_explain_needs_the_admin_token_and_a_well_formed_body(make_broker, http, issuer):
    b = await make_broker()
    token = issuer.mint(instance="i-x", workload="payments")
    async with http.post(f"{b.url}/v1/admin/policy/explain",
                         json={"token": token, "role": "dev-cert"},
                         headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 403
    for body, code in (({"role": "dev-cert"}, "invalid_token_field"),
                       ({"token": token}, "invalid_role"),
                       ({"token": token, "role": "dev-cert", "extra": 1}, "unknown_field")):
        async with http.post(f"{b.url}/v1/admin/policy/explain", headers=b.admin(),
                             json=body) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == code


async def test_brokerctl_policy_explain(broker, issuer, tmp_path):
    from tests.conftest import ADMIN_TOKEN

    token_file = tmp_path / "token"
    token_file.write_text(issuer.mint(instance="i-ctl-x", workload="payments") + "\n")
    env = {**os.environ, "BROKER_URL": broker.url, "BROKER_ADMIN_TOKEN": ADMIN_TOKEN}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli.ctl", "policy", "explain", "--token", str(token_file),
        "--role", "dev-db", env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    lines = out.decode().splitlines()
    assert lines[0] == "verdict   GRANTED"
    assert lines[1] == "token     valid, issuer dev"
    assert lines[2].startswith("identity  instance i-ctl-x, workload payments")
    assert lines[3] == "instance  never seen"
    assert lines[4] == "rules     applying: dev-workloads"
    assert lines[5] == "policy    dev-db: allowed by rule dev-workloads, ttl 600s"
