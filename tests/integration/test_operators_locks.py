"""Named operators with scopes, refusals audited, and locks, on real OpenBao and a real
store: a read operator cannot terminate (403, audited), a revoke operator can (with its
reason and incident recorded); an OIDC operator from a local issuer; a lock refuses
exchange and renewal on two brokers sharing one PostgreSQL at once, `lock rm` restores,
and a lock with a ttl lifts by itself."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker.dev.issuer import DevIssuer
from tests.conftest import ADMIN_SHA, ADMIN_TOKEN
from tests.harness.api import bearer, issue
from tests.harness.ports import held_socket, port_of, serve_app
from tests.harness.wait import eventually

READER, REVOKER = "rdr-" + "r" * 30, "rvk-" + "v" * 30
OPS_AUDIENCE = "broker-operators"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture(scope="module")
async def ops_issuer() -> AsyncIterator[DevIssuer]:
    """The operators' identity provider: its own key, its own audience."""
    sock = held_socket()
    ops = DevIssuer.generate(f"http://127.0.0.1:{port_of(sock)}", audience=OPS_AUDIENCE)
    runner, _ = await serve_app(ops.app(), sock, access_log=None)
    yield ops
    await runner.cleanup()


def admin_section(ops: DevIssuer) -> dict[str, Any]:
    return {
        "token_sha256": ADMIN_SHA,
        "operators": [
            {"name": "reader", "token_sha256": sha(READER), "scope": "read"},
            {"name": "revoker", "token_sha256": sha(REVOKER), "scope": "revoke"},
        ],
        "oidc": {
            "issuer": ops.issuer,
            "jwks_uri": f"{ops.issuer}/.well-known/jwks.json",
            "algorithms": ["ES256"],
            "audience": OPS_AUDIENCE,
            "max_token_lifetime": "1h",
            "scopes": [
                {"claim": "groups", "value": "sec-readers", "scope": "read"},
                {"claim": "groups", "value": "sec-oncall", "scope": "revoke"},
            ],
        },
    }


def operator_jwt(ops: DevIssuer, email: str, groups: list[str], **kw: Any) -> str:
    claims = {"email": email, "email_verified": True, "groups": groups}
    return ops.mint(instance="-", workload="op", claims=claims, **kw)


async def call(http: Any, method: str, url: str, token: str, body: Any = None) -> tuple[int, Any]:
    async with http.request(method, url, headers=bearer(token), json=body) as resp:
        return resp.status, await resp.json()


def events(b: Any, action: str) -> list[dict[str, Any]]:
    rows = sorted(b.rows("audit_events"), key=lambda r: r["seq"])
    out = []
    for r in rows:
        if r["action"] == action:
            detail = r["detail"] if isinstance(r["detail"], dict) else json.loads(r["detail"])
            out.append({**r, "detail": detail})
    return out


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_scopes_are_enforced_and_every_refusal_is_audited(
        make_broker, http, ops_issuer, store):
    b = await make_broker(store=store, overrides={"admin": admin_section(ops_issuer)})
    assert await call(http, "GET", f"{b.url}/v1/admin/whoami", READER) == (
        200, {"name": "reader", "scope": "read", "via": "token"})
    assert (await call(http, "GET", f"{b.url}/v1/admin/whoami", ADMIN_TOKEN))[1]["name"] == \
        "admin"
    status, _ = await issue(http, b, "i-ops-1", "dev-cert")
    assert status == 201

    before = b.store_snapshot()
    status, body = await call(http, "POST", f"{b.url}/v1/instances/i-ops-1/terminate", READER,
                              {"reason": "nope"})
    assert (status, body["error"]["code"]) == (403, "operator_scope_insufficient")
    assert "reader" in body["error"]["message"]
    status, body = await call(http, "POST", f"{b.url}/v1/instances/i-ops-1/terminate",
                              "not-a-token-of-anyone")
    assert (status, body["error"]["code"]) == (403, "admin_forbidden")
    status, body = await call(http, "POST", f"{b.url}/v1/admin/reconcile", REVOKER,
                              {"revoke_orphans": True})
    assert (status, body["error"]["code"]) == (403, "operator_scope_insufficient")
    async with http.get(f"{b.url}/v1/admin/leases") as resp:
        assert resp.status == 401

    refused = events(b, "admin.refused")
    assert [(e["actor"], e["outcome"], e["reason"], e["detail"]["method"],
             e["detail"]["route"], e["detail"]["scope"]) for e in refused] == [
        ("operator:reader", "refused", "operator_scope_insufficient", "POST",
         "/v1/instances/{instance_id}/terminate", "revoke"),
        ("unknown", "refused", "admin_forbidden", "POST",
         "/v1/instances/{instance_id}/terminate", "revoke"),
        ("operator:revoker", "refused", "operator_scope_insufficient", "POST",
         "/v1/admin/reconcile", "admin"),
        ("unknown", "refused", "admin_token_missing", "GET", "/v1/admin/leases", "read"),
    ]
    assert all(e["detail"]["source"] == "127.0.0.1" and e["detail"]["count"] == 1
               for e in refused)
    assert refused[1]["detail"]["token_fingerprint"].startswith("fp:")
    audit_text = json.dumps([r for r in b.rows("audit_events")], default=str)
    for secret in ("not-a-token-of-anyone", READER, REVOKER, sha(READER), ADMIN_TOKEN):
        assert secret not in audit_text
    # Refusals changed nothing but the audit.
    after = b.store_snapshot()
    assert {k: v for k, v in after.items() if k != "audit_events"} == \
        {k: v for k, v in before.items() if k != "audit_events"}

    status, body = await call(http, "POST", f"{b.url}/v1/instances/i-ops-1/terminate", REVOKER,
                              {"reason": "key leaked in CI log", "incident": "INC-42"})
    assert status == 202
    job = body["job"]
    assert (job["requested_by"], job["reason"], job["incident"]) == (
        "operator:revoker", "key leaked in CI log", "INC-42")
    [requested] = events(b, "instance.terminate_requested")
    assert (requested["actor"], requested["reason"], requested["detail"]["incident"]) == (
        "operator:revoker", "key leaked in CI log", "INC-42")
    status, body = await call(http, "POST", f"{b.url}/v1/instances/i-ops-2/terminate", REVOKER,
                              {"incident": "x" * 200})
    assert (status, body["error"]["code"]) == (400, "invalid_incident")


async def test_an_oidc_operator_gets_the_scope_its_claims_earn(make_broker, http, ops_issuer,
                                                                issuer):
    b = await make_broker(store="sqlite", overrides={"admin": admin_section(ops_issuer)})
    carol = operator_jwt(ops_issuer, "carol@example.org", ["staff", "sec-oncall"])
    assert await call(http, "GET", f"{b.url}/v1/admin/whoami", carol) == (
        200, {"name": "carol@example.org", "scope": "revoke", "via": "oidc"})
    # Replay is fine: a bearer session for as long as the token lives.
    assert (await call(http, "GET", f"{b.url}/v1/admin/whoami", carol))[0] == 200
    status, body = await call(http, "POST", f"{b.url}/v1/admin/locks", carol,
                              {"kind": "role", "value": "dev-db", "reason": "drill"})
    assert status == 201 and body["lock"]["created_by"] == "operator:carol@example.org"

    dave = operator_jwt(ops_issuer, "dave@example.org", ["staff"])
    status, body = await call(http, "GET", f"{b.url}/v1/admin/whoami", dave)
    assert (status, body["error"]["code"]) == (403, "operator_no_scope")
    expired = operator_jwt(ops_issuer, "carol@example.org", ["sec-oncall"], ttl=60,
                           now=__import__("time").time() - 600)
    status, body = await call(http, "GET", f"{b.url}/v1/admin/whoami", expired)
    assert (status, body["error"]["code"]) == (401, "operator_token_invalid")
    assert "token_expired" in body["error"]["message"]
    workload = b.token("i-ops-w")  # a workload's token is no operator's
    status, body = await call(http, "GET", f"{b.url}/v1/admin/whoami", workload)
    assert (status, body["error"]["code"]) == (401, "operator_token_invalid")
    # The two unauthenticated refusals share route, code and source: one kind, whatever
    # the token, so the second is counted for the window's end, not written at once.
    actors = [e["actor"] for e in events(b, "admin.refused")]
    assert actors == ["operator:dave@example.org", "unknown"]


async def test_a_lock_refuses_exchange_and_renewal_on_every_replica_at_once(
        make_broker, http, vault_setup):
    if not vault_setup.database_configured:
        pytest.skip("needs the database engine for a renewable lease")
    b1 = await make_broker()
    b2 = await make_broker(store_url=b1.store_url)
    status, cred = await issue(http, b2, "i-lock-1", "dev-db")
    assert status == 201, cred

    status, body = await call(http, "POST", f"{b1.url}/v1/admin/locks", ADMIN_TOKEN,
                              {"kind": "workload", "value": "payments",
                               "reason": "suspected compromise", "incident": "INC-9"})
    assert status == 201
    lock_id = body["lock"]["lock_id"]

    # The other replica refuses at once: no cache, no wait.
    status, body = await issue(http, b2, "i-lock-2", "dev-cert")
    assert (status, body["error"]["code"], body["error"]["lock_id"]) == (403, "locked", lock_id)
    assert lock_id in body["error"]["message"]
    async with http.post(f"{b2.url}/v1/leases/{cred['lease_id']}/renew",
                         headers=bearer(b2.token("i-lock-1"))) as resp:
        body = await resp.json()
        assert (resp.status, body["error"]["code"]) == (403, "locked")
    # Nothing was terminated: the lease stays active, the instance too.
    [lease] = [r for r in b1.rows("leases") if r["lease_id"] == cred["lease_id"]]
    assert lease["state"] == "active"
    assert not [r for r in b1.rows("instances") if r["instance_id"] == "i-lock-2"]
    # Another workload is untouched.
    assert (await issue(http, b2, "i-lock-3", "dev-cert", workload="billing"))[0] == 201
    refused = events(b1, "credential.refused")
    assert [(e["outcome"], e["detail"]["lock_id"], e["detail"]["request"]) for e in refused] \
        == [("locked", lock_id, "issue"), ("locked", lock_id, "renew")]
    [created] = events(b1, "lock.created")
    assert (created["actor"], created["reason"], created["detail"]["incident"]) == (
        "operator:admin", "suspected compromise", "INC-9")

    status, listed = await call(http, "GET", f"{b2.url}/v1/admin/locks", ADMIN_TOKEN)
    assert [x["lock_id"] for x in listed["locks"]] == [lock_id]
    status, body = await call(http, "DELETE", f"{b2.url}/v1/admin/locks/{lock_id}", ADMIN_TOKEN,
                              {"reason": "contained"})
    assert status == 200 and body["lock"]["removed_by"] == "operator:admin"
    assert (await issue(http, b1, "i-lock-2", "dev-cert"))[0] == 201
    async with http.post(f"{b1.url}/v1/leases/{cred['lease_id']}/renew",
                         headers=bearer(b1.token("i-lock-1"))) as resp:
        assert resp.status == 200, await resp.text()
    assert (await call(http, "GET", f"{b1.url}/v1/admin/locks", ADMIN_TOKEN))[1]["locks"] == []
    everything = (await call(http, "GET", f"{b1.url}/v1/admin/locks?all=true", ADMIN_TOKEN))[1]
    assert [x["lock_id"] for x in everything["locks"]] == [lock_id]
    status, body = await call(http, "DELETE", f"{b1.url}/v1/admin/locks/k-{'0' * 32}",
                              ADMIN_TOKEN)
    assert (status, body["error"]["code"]) == (404, "lock_not_found")


async def test_a_lock_with_a_ttl_lifts_by_itself_and_explain_and_preview_report_it(
        make_broker, http):
    b = await make_broker(store="sqlite")
    status, body = await call(http, "POST", f"{b.url}/v1/admin/locks", ADMIN_TOKEN,
                              {"kind": "claim", "claim": "team", "value": "red", "ttl": "3s",
                               "reason": "drill"})
    assert status == 201 and body["lock"]["expires_at"]
    lock_id = body["lock"]["lock_id"]
    token = b.token("i-ttl-1", claims={"team": "red"})

    status, explained = await call(http, "POST", f"{b.url}/v1/admin/policy/explain",
                                   ADMIN_TOKEN, {"token": token, "role": "dev-cert"})
    assert explained["lock"]["lock_id"] == lock_id and explained["decision"]["allowed"] is False
    status, preview = await call(http, "POST", f"{b.url}/v1/admin/policy/preview", ADMIN_TOKEN,
                                 {"issuer": "dev", "roles": ["dev-cert"],
                                  "claims": {"workload": "payments", "team": "red"}})
    assert [(r["granted"], r["code"], r.get("lock_id")) for r in preview["roles"]] == [
        (False, "locked", lock_id)]

    async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-cert"},
                         headers=bearer(token)) as resp:
        assert resp.status == 403
    blue = b.token("i-ttl-2", claims={"team": "blue"})
    async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-cert"},
                         headers=bearer(blue)) as resp:
        assert resp.status == 201

    async def lifted() -> bool:
        async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-cert"},
                             headers=bearer(b.token("i-ttl-1", claims={"team": "red"}))) as r:
            return r.status == 201

    await eventually(lifted, "the lock's ttl passed and exchanges went through", 30, 0.5)


@pytest.mark.parametrize(("body", "message"), [
    ({"kind": "instance", "value": "x", "reason": "r"}, "'kind' is required"),
    ({"kind": "workload", "reason": "r"}, "'value' is required"),
    ({"kind": "workload", "value": " x", "reason": "r"}, "'value' is required"),
    ({"kind": "workload", "value": "x"}, "'reason' is required"),
    ({"kind": "claim", "value": "x", "reason": "r"}, "needs 'claim'"),
    ({"kind": "role", "value": "x", "claim": "c", "reason": "r"}, "kind claim only"),
    ({"kind": "role", "value": "x", "reason": "r", "ttl": "soon"}, "ttl"),
    ({"kind": "role", "value": "x", "reason": "r", "incident": 5}, "incident"),
    # Finding 8a: locks that could never match.
    ({"kind": "role", "value": "Payments DB", "reason": "r"}, "configured roles: dev-cert"),
    ({"kind": "role", "value": "payments", "reason": "r"}, "no role 'payments'"),
    ({"kind": "issuer", "value": "https://issuer.example", "reason": "r"},
     "configured issuers: dev"),
], ids=["kind", "no-value", "padded-value", "no-reason", "claim-unnamed", "claim-on-role",
        "ttl", "incident", "role-not-a-name", "role-unknown", "issuer-unknown"])
async def test_a_bad_lock_is_refused_and_changes_nothing(broker, http, body, message):
    status, answer = await call(http, "POST", f"{broker.url}/v1/admin/locks", ADMIN_TOKEN, body)
    assert (status, answer["error"]["code"]) == (400, "invalid_lock")
    assert message in answer["error"]["message"]
    assert broker.rows("locks") == []


async def test_brokerctl_whoami_lock_and_revoke_with_a_reason(make_broker, http, ops_issuer):
    from tests.integration.test_cli import ctl_env, run

    b = await make_broker(store="sqlite", overrides={"admin": admin_section(ops_issuer)})
    code, out, err = await run("broker.cli.ctl", "whoami", env=ctl_env(b.url, READER))
    assert (code, out.strip()) == (0, "operator: reader (scope read, via token)"), err
    code, out, err = await run("broker.cli.ctl", "lock", "create", "--claim", "team=red",
                               "--ttl", "1h", "--reason", "drill", "--incident", "INC-5",
                               "-o", "json", env=ctl_env(b.url, REVOKER))
    assert code == 0, err
    lock = json.loads(out)
    assert (lock["kind"], lock["claim"], lock["value"], lock["created_by"]) == (
        "claim", "team", "red", "operator:revoker")
    code, out, _ = await run("broker.cli.ctl", "lock", "list", env=ctl_env(b.url, READER))
    assert code == 0 and lock["lock_id"] in out and "team=red" in out
    code, _, err = await run("broker.cli.ctl", "lock", "rm", lock["lock_id"],
                             env=ctl_env(b.url, READER))
    assert code == 4 and "operator_scope_insufficient" in err
    code, out, _ = await run("broker.cli.ctl", "lock", "rm", lock["lock_id"],
                             env=ctl_env(b.url, REVOKER))
    assert code == 0 and "removed by operator:revoker" in out
    code, _, err = await run("broker.cli.ctl", "lock", "create", "--role", "a", "--workload",
                             "b", "--reason", "x", env=ctl_env(b.url, REVOKER))
    assert code == 2 and "exactly one" in err
    code, out, err = await run("broker.cli.ctl", "revoke", "--instance", "i-ctl-op",
                               "--reason", "stolen laptop", "--incident", "INC-6", "-o", "json",
                               env=ctl_env(b.url, REVOKER))
    # Never seen by this broker: tombstoned all the same, and said with its own exit code.
    assert code == 9, err
    assert json.loads(out)["never_seen"] is True
    job = json.loads(out)["job"]
    assert (job["requested_by"], job["reason"], job["incident"]) == (
        "operator:revoker", "stolen laptop", "INC-6")
