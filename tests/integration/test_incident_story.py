"""Issue 12's incident, played end to end on real OpenBao and PostgreSQL, through
``brokerctl`` where an operator would use it.

200 instances of the workload ``payments`` (and a few bystanders of ``billing``) each hold a
real PostgreSQL login. A read-only operator cannot revoke (refused, and the refusal is in
the audit). The dry run shows the blast radius and changes nothing. ``alice`` (scope
revoke) cuts the one instance whose credential leaked first, then runs the bulk revocation
of the workload with a reason and an incident (its progress counting that earlier job
too), and while it runs she locks the workload: a
new payments instance is refused with the lock's id, bystanders are not. Afterwards every
one of the 200 logins fails and the bystanders' still work; ``audit verify`` passes with the
checkpoint signatures checked; the audit names alice, the reason, the incident, each
instance and the lock, and holds no token, token id or password. ``lock rm`` lets payments
draw credentials again (a terminated instance's token still draws nothing)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from typing import Any

import jwt
import psycopg
import pytest

from tests.conftest import ADMIN_SHA, ADMIN_TOKEN
from tests.harness.api import bearer
from tests.harness.pgauth import scram_password_matches
from tests.harness.wait import eventually
from tests.integration.test_cli import ctl_env, run

ALICE = "alc-" + secrets.token_urlsafe(24)
READER = "rdr-" + secrets.token_urlsafe(24)
PAYMENTS = 200
BYSTANDERS = 3
AT_ONCE = 8  # exchanges in flight at a time
REASON = "payments DB credentials exfiltrated via CI log"
INCIDENT = "INC-2026-0412"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def admin_section() -> dict[str, Any]:
    return {
        "token_sha256": ADMIN_SHA,
        "operators": [
            {"name": "alice", "token_sha256": sha(ALICE), "scope": "revoke"},
            {"name": "reader", "token_sha256": sha(READER), "scope": "read"},
        ],
    }


async def exchange(http: Any, b: Any, token: str, role: str = "dev-db") -> tuple[int, Any]:
    async with http.post(f"{b.url}/v1/credentials", json={"role": role},
                         headers=bearer(token)) as resp:
        return resp.status, await resp.json()


def login(pg: Any, user: str, password: str) -> str:
    with psycopg.connect(pg.url("postgres", user=user), password=password,
                         connect_timeout=5) as conn:
        return conn.execute("SELECT current_user").fetchone()[0]


def login_fails(pg: Any, user: str, password: str) -> bool:
    try:
        login(pg, user, password)
    except psycopg.OperationalError:
        return True
    return False


def login_works(pg: Any, user: str, password: str) -> bool:
    """The server trusts loopback logins, so a login alone proves the role exists; the
    SCRAM check proves this password is the one PostgreSQL holds for it."""
    return login(pg, user, password) == user and scram_password_matches(pg.admin_url, user,
                                                                        password)


async def ctl(*args: str, token: str, url: str, timeout: float = 300) -> tuple[int, str, str]:
    return await run("broker.cli.ctl", *args, env=ctl_env(url, token), timeout=timeout)


async def test_the_incident_story(make_broker, http, pg, vault_setup):
    if not vault_setup.database_configured:
        pytest.skip("needs the database engine for real PostgreSQL logins")
    b = await make_broker(store="postgresql", overrides={
        "admin": admin_section(),
        "audit": {"checkpoint": {"every": "1s"}},
    })
    url = b.url
    figures: dict[str, float] = {}

    # -- 200 payments instances and a few bystanders each draw one PostgreSQL login ----------
    tokens: dict[str, str] = {}
    creds: dict[str, dict[str, Any]] = {}
    gate = asyncio.Semaphore(AT_ONCE)

    async def draw(instance: str, workload: str) -> None:
        token = tokens[instance] = b.token(instance, workload)
        async with gate:
            status, cred = await exchange(http, b, token)
        assert status == 201, (instance, cred)
        creds[instance] = cred

    payments = [f"i-pay-{n:03d}" for n in range(PAYMENTS)]
    bystanders = [f"i-bill-{n}" for n in range(BYSTANDERS)]
    started = time.monotonic()
    await asyncio.gather(*(draw(i, "payments") for i in payments),
                         *(draw(i, "billing") for i in bystanders))
    figures["exchanges_s"] = time.monotonic() - started

    async def works(instance: str) -> bool:
        data = creds[instance]["data"]
        async with gate:
            return await asyncio.to_thread(login_works, pg, data["username"], data["password"])

    # Every login is real before the incident, so its failing afterwards means something.
    assert all(await asyncio.gather(*(works(i) for i in [*payments, *bystanders])))

    # -- a read operator cannot revoke: exit 4, and the refusal is audited ------------------
    code, _, err = await ctl("revoke", "--workload", "payments", "--yes", "--reason", "try",
                             token=READER, url=url)
    assert code == 4 and "operator_scope_insufficient" in err, err

    # -- the dry run shows the blast radius and changes nothing ------------------------------
    before = b.store_snapshot()
    code, out, err = await ctl("revoke", "--workload", "payments", "--dry-run", "-o", "json",
                               token=ALICE, url=url)
    assert code == 0, err
    radius = json.loads(out)
    assert (radius["instances"], radius["leases"]["live"]) == (PAYMENTS, PAYMENTS)
    assert radius["leases"]["by_role"] == {"dev-db": PAYMENTS}
    assert radius["leases"]["by_engine"] == {"database": PAYMENTS}
    assert radius["workloads"]["top"] == [{"workload": "payments", "instances": PAYMENTS}]
    assert radius["never_seen"] == [] and radius["already_terminated"] == 0
    code, out, err = await ctl("revoke", "--workload", "payments", "--dry-run",
                               token=ALICE, url=url)
    assert code == 0, err
    assert out.startswith(f"dry run: nothing was changed. This selection reaches {PAYMENTS} "
                          f"active instance(s) holding {PAYMENTS} live lease(s)"), out
    assert "dev-db" in out and "database" in out and "payments" in out
    assert b.store_snapshot() == before

    # -- alice first cuts the instance whose credential leaked, on its own ------------------
    code, out, err = await ctl("revoke", "--instance", "i-pay-000", "--reason", REASON,
                               "--incident", INCIDENT, token=ALICE, url=url)
    assert code == 0 and out.startswith("instance i-pay-000: revocation job j-"), (out, err)

    # -- then revokes the workload, and locks it while the revocation runs -----------------
    started = time.monotonic()
    revoking = asyncio.create_task(ctl(
        "revoke", "--workload", "payments", "--yes", "--reason", REASON, "--incident",
        INCIDENT, "--wait", "--timeout", "240", token=ALICE, url=url))
    code, out, err = await ctl("lock", "create", "--workload", "payments", "--reason", REASON,
                               "--incident", INCIDENT, "-o", "json", token=ALICE, url=url)
    assert code == 0, err
    lock = json.loads(out)
    assert (lock["kind"], lock["value"], lock["created_by"]) == (
        "workload", "payments", "operator:alice")
    lock_id = lock["lock_id"]

    status, body = await exchange(http, b, b.token("i-pay-new", "payments"))
    assert (status, body["error"]["code"], body["error"]["lock_id"]) == (403, "locked", lock_id)
    assert lock_id in body["error"]["message"]
    status, cred = await exchange(http, b, b.token("i-bill-new", "billing"))
    assert status == 201, cred
    creds["i-bill-new"] = cred
    bystanders.append("i-bill-new")

    code, out, err = await revoking
    figures["revoke_wait_s"] = time.monotonic() - started
    assert code == 0, (out, err)
    # The progress and the summary count the selection's jobs, i-pay-000's included.
    assert out.splitlines() == [
        f"terminated {PAYMENTS - 1} instance(s); {PAYMENTS - 1} live lease(s) queued for "
        "revocation",
        f"done: {PAYMENTS} job(s) done, 0 failed; leases {PAYMENTS} ended, 0 still live "
        "(1 of the jobs from earlier terminations)"], out
    assert f"instances {PAYMENTS}/{PAYMENTS} done, 0 left" in err, err
    assert "brokerctl: " in err  # progress on stderr

    # -- every payments login fails; bystanders' still work ----------------------------------
    for instance in payments:  # bounded: one attempt each, the jobs are done
        data = creds[instance]["data"]
        assert await asyncio.to_thread(login_fails, pg, data["username"], data["password"]), \
            instance
    for instance in bystanders:
        data = creds[instance]["data"]
        assert await asyncio.to_thread(login_works, pg, data["username"], data["password"]), \
            instance
    states = {r["instance_id"]: r["state"] for r in b.rows("instances")}
    assert {states[i] for i in payments} == {"terminated"}
    assert {states[i] for i in bystanders} == {"active"}
    assert "i-pay-new" not in states  # refused by the lock before anything was recorded

    # -- the audit: verified, signed, and it says who, why and what --------------------------
    last_seq = max(r["seq"] for r in b.rows("audit_events"))

    async def signed_up_to_now() -> bool:
        code, out, _ = await ctl("audit", "verify", "-o", "json", token=READER, url=url)
        report = json.loads(out)
        return code == 0 and report.get("last_checkpoint_seq") is not None and \
            report["last_checkpoint_seq"] >= last_seq

    await eventually(signed_up_to_now, "a signed checkpoint covering the incident", 60, 0.5)
    code, out, err = await ctl("audit", "verify", "-o", "json", token=READER, url=url)
    assert code == 0, (out, err)
    report = json.loads(out)
    assert report["ok"] is True and report["signatures_checked"] is True, report
    assert report["findings"] == [] and report["checkpoints"] >= 1
    code, out, _ = await ctl("audit", "verify", token=READER, url=url)
    assert code == 0 and "chain OK" in out, out

    code, out, err = await ctl("audit", "list", "--actor", "operator:alice", "--limit", "1000",
                               "-o", "json", token=READER, url=url)
    assert code == 0, err
    alices = json.loads(out)
    requested = [e for e in alices if e["action"] == "instance.terminate_requested"]
    assert sorted(e["instance_id"] for e in requested) == payments
    assert {(e["reason"], e["detail"]["incident"]) for e in requested} == {(REASON, INCIDENT)}
    [created] = [e for e in alices if e["action"] == "lock.created"]
    assert (created["reason"], created["detail"]["incident"]) == (REASON, INCIDENT)
    code, out, _ = await ctl("audit", "list", "--action", "admin.refused", "-o", "json",
                             token=READER, url=url)
    [refused] = json.loads(out)
    assert (refused["actor"], refused["outcome"], refused["reason"]) == (
        "operator:reader", "refused", "operator_scope_insufficient")
    code, out, _ = await ctl("audit", "list", "--action", "credential.refused", "-o", "json",
                             token=READER, url=url)
    assert [(e["outcome"], e["detail"]["lock_id"]) for e in json.loads(out)] == [
        ("locked", lock_id)]

    # No secret in any event: no token, token id, accessor, password or operator token.
    dumped = json.dumps(b.rows("audit_events"), default=str)
    jtis = [jwt.decode(t, options={"verify_signature": False})["jti"] for t in tokens.values()]
    accessors = [t["accessor"] for t in b.rows("instance_tokens")]
    passwords = [c["data"]["password"] for c in creds.values()]
    for secret in [*tokens.values(), *jtis, *accessors, *passwords, ALICE, READER,
                   ADMIN_TOKEN, sha(ALICE), sha(READER)]:
        assert secret not in dumped

    # -- the incident contained: lock rm, and payments draws credentials again ---------------
    code, out, err = await ctl("lock", "rm", lock_id, "--reason", "rotated; contained",
                               "--incident", INCIDENT, token=ALICE, url=url)
    assert code == 0 and "removed by operator:alice" in out, (out, err)
    status, cred = await exchange(http, b, b.token("i-pay-after", "payments"))
    assert status == 201, cred
    # A terminated instance's token still draws nothing, lock or no lock.
    status, body = await exchange(http, b, tokens["i-pay-001"])
    assert (status, body["error"]["code"]) == (409, "instance_terminated")
    data = cred["data"]
    assert await asyncio.to_thread(login_works, pg, data["username"], data["password"])

    print(f"\nincident story figures: {json.dumps({k: round(v, 1) for k, v in figures.items()})}")
