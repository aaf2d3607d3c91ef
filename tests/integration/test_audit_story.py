"""The audit trail of a workload's whole story on a real broker (OpenBao, PostgreSQL):
exchange, renew, release, an operator's termination, an instance ending itself. Each step
leaves its event with its actor, subject and target; no token, token id, accessor or
credential value appears in any event; the chain verifies through the API and brokerctl,
and brokerctl names a tampered event and exits 8."""

from __future__ import annotations

import hashlib
import hmac
import json

import jwt
import sqlalchemy as sa

from broker.leases.migrations import sync_url
from tests.harness.wait import eventually
from tests.integration.test_cli import ctl_env, run

HASH_KEY = "k" * 40


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def post(http, url: str, **kw):
    async with http.post(url, **kw) as resp:
        return resp.status, await resp.json()


def events(b) -> list[dict]:
    return sorted(b.rows("audit_events"), key=lambda r: r["seq"])


async def test_every_step_is_audited_and_nothing_secret_is(make_broker, http, pg):
    b = await make_broker(overrides={"audit": {"hash_key": HASH_KEY}},
                          issuer_overrides={"replay": "jti_once"})
    tokens = [b.token("i-story") for _ in range(4)]
    status, db_cred = await post(http, f"{b.url}/v1/credentials", json={"role": "dev-db"},
                                 headers=bearer(tokens[0]))
    assert status == 201, db_cred
    status, cert = await post(http, f"{b.url}/v1/credentials", json={"role": "dev-cert"},
                              headers=bearer(tokens[1]))
    assert status == 201, cert
    status, _ = await post(http, f"{b.url}/v1/leases/{db_cred['lease_id']}/renew",
                           json={"ttl": "5m"}, headers=bearer(tokens[2]))
    assert status == 200
    async with http.delete(f"{b.url}/v1/leases/{db_cred['lease_id']}",
                           headers=bearer(tokens[2])) as resp:
        assert resp.status == 204
    status, second = await post(http, f"{b.url}/v1/credentials", json={"role": "dev-db"},
                                headers=bearer(tokens[3]))
    assert status == 201
    status, _ = await post(http, f"{b.url}/v1/instances/i-story/terminate", headers=b.admin())
    assert status == 202

    def done(instance: str):
        async def recorded():
            return any(e["action"] == "instance.terminated" and e["instance_id"] == instance
                       for e in events(b))
        return recorded
    await eventually(done("i-story"), "the termination of i-story recorded as done")

    own = b.token("i-self")
    status, _ = await post(http, f"{b.url}/v1/instances/self/terminate", headers=bearer(own),
                           json={"reason": "scaled in"})
    assert status == 202
    # Its job ends too (nothing to revoke): the trail read below is then the whole chain.
    await eventually(done("i-self"), "the termination of i-self recorded as done")

    trail = events(b)
    story = [(e["actor"], e["action"], e["lease_id"]) for e in trail
             if e["instance_id"] == "i-story"]
    lid, cid, sid = db_cred["lease_id"], cert["lease_id"], second["lease_id"]
    for expected in [("broker", "instance.token_created", None),
                     ("workload", "lease.issued", lid), ("workload", "lease.issued", cid),
                     ("workload", "lease.renewed", lid), ("workload", "lease.released", lid),
                     ("workload", "lease.issued", sid),
                     ("operator:admin", "instance.terminate_requested", None),
                     ("revocation", "instance.token_revoked", None)]:
        assert expected in story, expected
    actions = [a for _, a, _ in story]
    assert actions.index("lease.released") < actions.index("instance.terminate_requested")
    assert actions[-1] == "instance.terminated"
    assert any(a in ("leases.revoked", "leases.expired") for a in actions)

    issued = next(e for e in trail if e["action"] == "lease.issued" and e["lease_id"] == lid)
    jti = jwt.decode(tokens[0], options={"verify_signature": False})["jti"]
    expected_ref = hmac.new(HASH_KEY.encode(), b"dev\x00" + jti.encode(),
                            hashlib.sha256).hexdigest()
    assert issued["detail"] == {
        "issuer": "dev", "workload": "payments", "token": f"hmac-sha256:{expected_ref}",
        "role": "dev-db", "kind": "database_login", "engine": "database", "state": "active",
        "vault_lease_id": issued["detail"]["vault_lease_id"], "renewable": True,
        "expires_at": issued["detail"]["expires_at"],
        # The login's name, not a secret: what cleans up a lease Vault forgot.
        "credential_ref": {"username": db_cred["data"]["username"]},
    }
    mine = next(e for e in trail if e["instance_id"] == "i-self")
    assert (mine["actor"], mine["action"], mine["reason"]) == (
        "workload:dev", "instance.terminate_requested", "scaled in")

    # Nothing secret in any event: no token, no token id, no accessor, no credential value.
    dumped = json.dumps(trail, default=str)
    jtis = [jwt.decode(t, options={"verify_signature": False})["jti"] for t in [*tokens, own]]
    secrets_seen = [*tokens, own, *jtis, db_cred["data"]["password"],
                    second["data"]["password"], cert["data"]["private_key"],
                    *(t["accessor"] for t in b.rows("instance_tokens"))]
    for secret in secrets_seen:
        # As json.dumps would write it (a PEM's newlines escaped), and its longest line
        # alone, so a multi-line secret cannot pass by its escaping.
        longest = max(secret.splitlines(), key=len)
        assert json.dumps(secret)[1:-1] not in dumped and longest not in dumped

    # The chain verifies, through the API and through brokerctl.
    status, report = await post(http, f"{b.url}/v1/admin/audit/verify", headers=b.admin())
    assert status == 200 and report["ok"] is True, report
    assert report["events"] == len(trail) and report["signatures_checked"] is True  # transit keys
    code, out, _ = await run("broker.cli.ctl", "audit", "verify", env=ctl_env(b.url))
    assert code == 0 and "chain OK" in out, out
    code, out, _ = await run("broker.cli.ctl", "audit", "verify", "--from", "3", "-o", "json",
                             env=ctl_env(b.url))
    assert code == 0 and json.loads(out)["from_seq"] == 3

    status, err = await post(http, f"{b.url}/v1/admin/audit/verify", headers=b.admin(),
                             json={"from": 0})
    assert (status, err["error"]["code"]) == (400, "invalid_field")

    # Tampered: named by seq, exit 8.
    engine = sa.create_engine(sync_url(b.store_url))
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE audit_events SET reason = 'nothing' WHERE seq = 4"))
    engine.dispose()
    code, out, _ = await run("broker.cli.ctl", "audit", "verify", env=ctl_env(b.url))
    assert code == 8, out
    assert "first bad seq 4" in out
    assert any(line.split()[:2] == ["4", "altered"] for line in out.splitlines())
