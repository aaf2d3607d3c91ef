"""An instance may end itself, never another: ``POST /v1/instances/self/terminate`` ends
only the instance its own identity token names, under that token's issuer and workload. A
token that is replayed, expired, forged, meant for another audience or missing ends
nothing, and neither does a token whose instance id another issuer or workload owns: the
store and Vault are compared whole before and after each refusal."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg

from broker.dev.issuer import DevIssuer
from tests.harness.api import bearer, issue, wait_job
from tests.harness.ports import held_socket, port_of, serve_app
from tests.harness.wait import eventually

TABLES = ("instances", "instance_tokens", "leases", "revocation_jobs", "audit_events",
          "seen_tokens")
SELF = "/v1/instances/self/terminate"


async def self_terminate(http: Any, b: Any, token: str | None,
                         **kw: Any) -> tuple[int, dict[str, Any]]:
    headers = bearer(token) if token is not None else {}
    async with http.post(f"{b.url}{SELF}", headers=headers, **kw) as resp:
        return resp.status, await resp.json()


def everything(b: Any, vault: Any) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Every row of every table the broker writes, and what Vault holds."""
    return {t: sorted(map(repr, b.rows(t))) for t in TABLES}, vault.snapshot()


def can_log_in(pg: Any, user: str, password: str) -> bool:
    """Whether the login connects and runs a query. A login racing the role's removal
    may connect and then fail ('invalid role OID'): that is not logging in either."""
    try:
        with psycopg.connect(pg.url("postgres", user=user), password=password,
                             connect_timeout=5) as conn:
            return conn.execute("SELECT current_user").fetchone()[0] == user
    except psycopg.Error:
        return False


def replay_on(issuer: DevIssuer, *others: tuple[str, DevIssuer]) -> dict[str, Any]:
    """Settings overrides: the dev issuer (and ``others``) with replay protection on,
    each allowed the dev roles."""
    issuers = [("dev", issuer), *others]
    return {
        "identity": {"audience": issuer.audience, "issuers": [
            {"name": name, "issuer": i.issuer, "jwks_uri": f"{i.issuer}/.well-known/jwks.json",
             "algorithms": ["ES256"], "instance_claim": "instance_id",
             "workload_claim": "workload", "replay": "jti_once"} for name, i in issuers]},
        "policy": {"rules": [{"name": f"all-{name}", "issuer": name,
                              "allow": ["dev-cert", "dev-db"]} for name, _ in issuers]},
    }


async def test_an_instance_ends_itself_its_login_stops_working_and_nothing_new_is_issued(
        broker, http, pg, vault):
    b = broker
    status, cred = await issue(http, b, "i-st-self", "dev-db")
    assert status == 201, cred
    user, password = cred["data"]["username"], cred["data"]["password"]
    assert can_log_in(pg, user, password)

    token = b.token("i-st-self")
    status, body = await self_terminate(http, b, token, json={"reason": "pod stopping"})
    assert status == 202, body
    assert body["instance_id"] == "i-st-self"
    job = body["job"]
    assert set(job) == {"job_id", "instance_id", "state", "attempts", "next_attempt_at",
                        "last_error", "requested_by", "created_at", "completed_at",
                        "reason", "incident"}
    assert (job["instance_id"], job["requested_by"]) == ("i-st-self", "workload:dev")
    assert (job["reason"], job["incident"]) == ("pod stopping", None)
    assert job["state"] in ("pending", "running", "done")

    await eventually(lambda: asyncio.to_thread(lambda: not can_log_in(pg, user, password)),
                     f"the PostgreSQL login {user} refused after self-termination")
    shown = await wait_job(http, b, "i-st-self")
    assert shown["state"] == "terminated" and shown["job"]["state"] == "done"
    assert [x["state"] for x in shown["leases"]] == ["revoked"]
    assert not pg.role_exists(user)
    assert not vault.lease_exists(shown["leases"][0]["vault_lease_id"])

    status, refused = await issue(http, b, "i-st-self", "dev-db")
    assert (status, refused["error"]["code"]) == (409, "instance_terminated")

    # Idempotent: the same job, finished, and nothing recorded twice.
    status, again = await self_terminate(http, b, token)
    assert status == 202
    assert again["job"]["job_id"] == job["job_id"] and again["job"]["state"] == "done"
    assert len(b.rows("revocation_jobs")) == 1
    [requested] = [e for e in b.rows("audit_events")
                   if e["action"] == "instance.terminate_requested"]
    assert (requested["actor"], requested["instance_id"], requested["reason"]) == (
        "workload:dev", "i-st-self", "pod stopping")
    # The dev issuer has no jti replay rule: no token id is used, and the event says
    # self_terminated all the same (finding 8b: it once said False).
    assert requested["detail"] == {"job_id": job["job_id"], "workload": "payments",
                                   "issuer": "dev", "previous_state": "active",
                                   "self_terminated": True}


async def test_another_instances_token_ends_only_its_own_instance(broker, http, pg, vault):
    b = broker
    status, victim = await issue(http, b, "i-st-victim", "dev-db")
    assert status == 201, victim
    user, password = victim["data"]["username"], victim["data"]["password"]
    attacker = b.token("i-st-attacker")

    # The request cannot name the instance: not in the body, not through the admin route.
    before = everything(b, vault)
    status, body = await self_terminate(http, b, attacker, json={"instance_id": "i-st-victim"})
    assert (status, body["error"]["code"]) == (400, "unknown_field")
    async with http.post(f"{b.url}/v1/instances/i-st-victim/terminate",
                         headers=bearer(attacker)) as resp:
        assert (resp.status, (await resp.json())["error"]["code"]) == (403, "admin_forbidden")
    after = everything(b, vault)
    # Nothing changed but the audit of the refused admin call.
    new = set(after[0]["audit_events"]) - set(before[0]["audit_events"])
    assert len(new) == 1 and "admin.refused" in next(iter(new))
    assert ({**after[0], "audit_events": []}, after[1]) == (
        {**before[0], "audit_events": []}, before[1])

    # Whatever else the request says, the token's own instance is the one that ends.
    async with http.post(f"{b.url}{SELF}?instance_id=i-st-victim",
                         headers=bearer(attacker)) as resp:
        assert resp.status == 202
        assert (await resp.json())["instance_id"] == "i-st-attacker"
    assert (await wait_job(http, b, "i-st-attacker"))["state"] == "terminated"

    async with http.get(f"{b.url}/v1/instances/i-st-victim", headers=b.admin()) as resp:
        shown = await resp.json()
    assert shown["state"] == "active" and shown["job"] is None
    assert [x["state"] for x in shown["leases"]] == ["active"]
    assert vault.lease_exists(shown["leases"][0]["vault_lease_id"])
    assert can_log_in(pg, user, password)
    assert [j["instance_id"] for j in b.rows("revocation_jobs")] == ["i-st-attacker"]
    status, more = await issue(http, b, "i-st-victim", "dev-cert")
    assert status == 201, more


async def test_a_replayed_token_ends_nothing(make_broker, http, issuer, vault):
    """With replay protection on, self-termination uses up the token's jti like an
    exchange does: a token already used (for an exchange or to end the instance) is
    refused; a fresh token of the same instance gets the same job."""
    b = await make_broker(overrides=replay_on(issuer))
    used = b.token("i-st-replay")
    status, cred = await issue_with(http, b, used, "dev-db")
    assert status == 201, cred

    before = everything(b, vault)
    status, body = await self_terminate(http, b, used)
    assert (status, body["error"]["code"]) == (401, "token_replayed")
    assert everything(b, vault) == before

    fresh = b.token("i-st-replay")
    status, first = await self_terminate(http, b, fresh)
    assert status == 202, first
    await wait_job(http, b, "i-st-replay")
    before = everything(b, vault)
    status, body = await self_terminate(http, b, fresh)
    assert (status, body["error"]["code"]) == (401, "token_replayed")
    assert everything(b, vault) == before

    status, again = await self_terminate(http, b, b.token("i-st-replay"))
    assert status == 202 and again["job"]["job_id"] == first["job"]["job_id"]
    assert len(b.rows("seen_tokens")) == 3


async def issue_with(http: Any, b: Any, token: str, role: str) -> tuple[int, Any]:
    async with http.post(f"{b.url}/v1/credentials", headers=bearer(token),
                         json={"role": role}) as resp:
        return resp.status, await resp.json()


async def test_an_expired_forged_misaddressed_or_missing_token_ends_nothing(
        broker, http, issuer, vault):
    b = broker
    status, cred = await issue(http, b, "i-st-target", "dev-db")
    assert status == 201, cred
    forger = DevIssuer(DevIssuer.generate(issuer.issuer).key, issuer.kid, issuer.issuer)
    stranger = DevIssuer.generate("http://127.0.0.1:9")
    mint = {"instance": "i-st-target", "workload": "payments"}
    cases = {
        "token_expired": bearer(issuer.mint(**mint, ttl=60, now=time.time() - 3600)),
        "token_bad_signature": bearer(forger.mint(**mint)),
        "token_wrong_audience": bearer(issuer.mint(**mint, claims={"aud": "another-service"})),
        "token_unknown_issuer": bearer(stranger.mint(**mint)),
        "token_missing": {},
        "token_malformed": bearer("not-a-jwt"),
    }
    # The issuance noted a sighting that a tick writes (last_seen_at) every few seconds:
    # write it now, or it may land between the snapshots and look like a refusal's doing.
    components = b.broker.components

    async def sightings_written() -> bool:
        await components.flush_sightings.run_once()
        return len(components.sightings) == 0

    await eventually(sightings_written, "the issuance's sighting written")
    before = everything(b, vault)
    for code, headers in cases.items():
        async with http.post(f"{b.url}{SELF}", headers=headers,
                             json={"reason": "let me in"}) as resp:
            answer = await resp.json()
        assert (resp.status, answer["error"]["code"]) == (401, code), answer
        assert everything(b, vault) == before, code
    async with http.get(f"{b.url}/v1/instances/i-st-target", headers=b.admin()) as resp:
        assert (await resp.json())["state"] == "active"


async def test_an_instance_id_another_workload_or_issuer_owns_is_refused_and_left_alone(
        make_broker, http, issuer, vault):
    sock = held_socket()
    other = DevIssuer.generate(f"http://127.0.0.1:{port_of(sock)}")
    runner, _ = await serve_app(other.app(), sock, access_log=None)
    try:
        b = await make_broker(overrides=replay_on(issuer, ("other", other)))
        status, cred = await issue_with(
            http, b, issuer.mint(instance="i-st-owned", workload="payments"), "dev-db")
        assert status == 201, cred

        before = everything(b, vault)
        for token, code in (
            (issuer.mint(instance="i-st-owned", workload="billing"),
             "instance_workload_mismatch"),
            (other.mint(instance="i-st-owned", workload="payments"), "instance_issuer_mismatch"),
        ):
            status, body = await self_terminate(http, b, token)
            assert (status, body["error"]["code"]) == (403, code)
            # Nothing changed: no tombstone, no job, no audit event, and the jti not used up.
            assert everything(b, vault) == before, code

        # The owner's own token still can.
        status, body = await self_terminate(
            http, b, issuer.mint(instance="i-st-owned", workload="payments"))
        assert status == 202 and body["job"]["requested_by"] == "workload:dev"
    finally:
        await runner.cleanup()


async def test_an_instance_never_seen_is_tombstoned_for_its_issuer_and_workload(
        broker, http, vault):
    b = broker
    status, body = await self_terminate(http, b, b.token("i-st-fresh", workload="payments"))
    assert status == 202, body
    [instance] = b.rows("instances")
    assert (instance["instance_id"], instance["issuer_name"], instance["workload"]) == (
        "i-st-fresh", "dev", "payments")
    status, refused = await issue(http, b, "i-st-fresh", "dev-db")
    assert (status, refused["error"]["code"]) == (409, "instance_terminated")
    status, other = await issue(http, b, "i-st-fresh", "dev-db", workload="billing")
    assert (status, other["error"]["code"]) == (403, "instance_workload_mismatch")


async def test_a_bad_body_ends_nothing_and_does_not_use_up_the_token(
        make_broker, http, issuer, vault):
    b = await make_broker(overrides=replay_on(issuer))
    token = b.token("i-st-body")
    before = everything(b, vault)
    for kw, code in (
        ({"json": {"reason": "x" * 201}}, "invalid_reason"),
        ({"json": {"reason": "line\nbreak"}}, "invalid_reason"),
        ({"json": {"reason": "\x1b[31mred"}}, "invalid_reason"),
        ({"json": {"reason": 7}}, "invalid_reason"),
        ({"json": {"reason": "ok", "instance": "i-other"}}, "unknown_field"),
        ({"json": ["reason"]}, "malformed_json"),
        ({"data": b"{not json"}, "malformed_json"),
    ):
        status, body = await self_terminate(http, b, token, **kw)
        assert (status, body["error"]["code"]) == (400, code), kw
        assert everything(b, vault) == before, kw
    status, body = await self_terminate(http, b, token, json={"reason": "x" * 200})
    assert status == 202, body
    [event] = [e for e in b.rows("audit_events") if e["action"] == "instance.terminate_requested"]
    assert event["reason"] == "x" * 200
