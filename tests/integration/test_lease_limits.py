"""Per-role lease limits: a workload that asks again and again (a crash loop) cannot grow
its lease count in Vault. Past the limit the oldest lease is revoked as the new one is
issued, or the request is refused, per role; the response says which happened."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import psycopg
import pytest

from broker.vault.bootstrap import PKI_DOMAIN, PKI_MOUNT

LIMIT_ROLE = "limit-cert"
LIMIT_POLICY = "broker-instance-limits"


@pytest.fixture(scope="module")
def limit_pki_role(vault, vault_setup) -> Iterator[str]:
    """A PKI role of its own, so that Vault's lease list under it holds only this module's."""
    status, body = vault.call("POST", f"{PKI_MOUNT}/roles/{LIMIT_ROLE}", {
        "allowed_domains": [PKI_DOMAIN], "allow_subdomains": True, "key_type": "ec",
        "key_bits": 256, "ttl": "10m", "max_ttl": "1h", "generate_lease": True})
    assert status in (200, 204), body
    policy = f'path "{PKI_MOUNT}/issue/{LIMIT_ROLE}" {{ capabilities = ["update"] }}'
    status, body = vault.call("PUT", f"sys/policies/acl/{LIMIT_POLICY}", {"policy": policy})
    assert status in (200, 204), body
    yield LIMIT_ROLE
    vault.call("PUT", f"sys/leases/revoke-prefix/{PKI_MOUNT}/issue/{LIMIT_ROLE}", {"sync": True})
    vault.call("DELETE", f"{PKI_MOUNT}/roles/{LIMIT_ROLE}")
    vault.call("DELETE", f"sys/policies/acl/{LIMIT_POLICY}")


def _cert_role(max_leases: int, on_limit: str) -> dict:
    return {"engine": "pki", "mount": PKI_MOUNT, "vault_role": LIMIT_ROLE,
            "default_ttl": "10m", "max_ttl": "1h",
            "params": {"common_name": "{workload}.workload.internal"},
            "max_leases_per_instance": max_leases, "on_limit": on_limit}


async def _issue(http, b, token: str, role: str) -> tuple[int, dict]:
    async with http.post(f"{b.url}/v1/credentials", json={"role": role},
                         headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, await resp.json()


def _live(b, instance: str, role: str) -> list[dict]:
    return [r for r in b.rows("leases") if r["instance_id"] == instance and r["role"] == role
            and r["state"] in ("issuing", "active", "revoking")]


async def test_a_crash_loop_of_500_requests_keeps_three_leases(make_broker, http, vault,
                                                               limit_pki_role):
    b = await make_broker(extra_roles={"looping": _cert_role(3, "revoke_oldest")},
                          instance_policies=(LIMIT_POLICY,))
    token = b.token("i-crashloop")
    vault_prefix = f"{PKI_MOUNT}/issue/{LIMIT_ROLE}/"
    issued: list[str] = []
    for n in range(500):
        status, body = await _issue(http, b, token, "looping")
        assert status == 201, body
        issued.append(body["lease_id"])
        expected_revoked = [issued[n - 3]] if n >= 3 else []
        assert body["lease_limit"] == {"max_leases": 3, "on_limit": "revoke_oldest",
                                       "revoked": expected_revoked, "revocation_pending": []}
        if n % 50 == 49:
            assert len(_live(b, "i-crashloop", "looping")) == 3
            assert len(vault.leases_under(vault_prefix)) == 3
    live = _live(b, "i-crashloop", "looping")
    assert sorted(r["lease_id"] for r in live) == sorted(issued[-3:])
    assert all(r["state"] == "active" for r in live)
    rows = {r["lease_id"]: r for r in b.rows("leases")}
    assert {rows[lid]["state"] for lid in issued[:-3]} == {"revoked"}
    assert {rows[lid]["error_code"] for lid in issued[:-3]} == {"superseded"}
    in_vault = {lid.rsplit("/", 1)[-1] for lid in vault.leases_under(vault_prefix)}
    assert in_vault == {rows[lid]["vault_lease_id"].rsplit("/", 1)[-1] for lid in issued[-3:]}


async def test_refuse_mode_says_so_and_records_nothing(make_broker, http, vault, limit_pki_role):
    b = await make_broker(extra_roles={"strict": _cert_role(2, "refuse")},
                          instance_policies=(LIMIT_POLICY,))
    token = b.token("i-strict")
    first = [await _issue(http, b, token, "strict") for _ in range(2)]
    assert [s for s, _ in first] == [201, 201]
    assert first[1][1]["lease_limit"] == {"max_leases": 2, "on_limit": "refuse",
                                          "revoked": [], "revocation_pending": []}
    prefix = f"{PKI_MOUNT}/issue/{LIMIT_ROLE}/"
    before, vault_before = b.store_snapshot(), vault.leases_under(prefix)
    status, body = await _issue(http, b, token, "strict")
    assert status == 409
    assert body["error"]["code"] == "lease_limit_reached"
    assert "release one" in body["error"]["message"]
    assert b.store_snapshot() == before
    assert vault.leases_under(prefix) == vault_before
    # Another instance of the same workload has its own allowance.
    assert (await _issue(http, b, b.token("i-strict-2"), "strict"))[0] == 201
    # Releasing one makes room.
    async with http.delete(f"{b.url}/v1/leases/{first[0][1]['lease_id']}",
                           headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 204
    assert (await _issue(http, b, token, "strict"))[0] == 201


async def test_replaced_database_logins_stop_working(make_broker, http, pg, vault):
    b = await make_broker(extra_roles={"db-limited": {
        "engine": "database", "mount": "database", "vault_role": "dev-db",
        "default_ttl": "10m", "max_ttl": "1h", "max_leases_per_instance": 2}})
    token = b.token("i-db-loop")
    logins = []
    for _ in range(6):
        status, body = await _issue(http, b, token, "db-limited")
        assert status == 201, body
        logins.append(body["data"]["username"])
    with psycopg.connect(pg.admin_url) as conn:
        existing = {r[0] for r in conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (logins,))}
    assert existing == set(logins[-2:])
    rows = [r for r in b.rows("leases") if r["instance_id"] == "i-db-loop"]
    alive = {r["vault_lease_id"] for r in rows if vault.lease_exists(r["vault_lease_id"])}
    assert alive == {r["vault_lease_id"] for r in rows if r["state"] == "active"}
    assert len(alive) == 2


async def test_concurrent_requests_of_one_instance_never_exceed_the_limit(
        make_broker, http, vault, limit_pki_role):
    b = await make_broker(extra_roles={"looping": _cert_role(3, "revoke_oldest")},
                          instance_policies=(LIMIT_POLICY,))
    token = b.token("i-burst")
    answers = await asyncio.gather(*(_issue(http, b, token, "looping") for _ in range(24)))
    statuses = sorted({s for s, _ in answers})
    assert set(statuses) <= {201, 409}, answers
    assert any(s == 201 for s, _ in answers)
    assert {body["error"]["code"] for s, body in answers if s == 409} <= {"lease_limit_reached"}
    live = _live(b, "i-burst", "looping")
    assert len(live) <= 3
    assert all(r["state"] == "active" for r in live)
    alive = [r for r in b.rows("leases")
             if r["instance_id"] == "i-burst" and vault.lease_exists(r["vault_lease_id"] or "-")]
    assert sorted(r["lease_id"] for r in alive) == sorted(r["lease_id"] for r in live)


async def test_a_lease_left_revoking_by_a_dead_request_is_swept(make_broker, http, vault,
                                                                limit_pki_role):
    b = await make_broker(extra_roles={"looping": _cert_role(1, "revoke_oldest")},
                          instance_policies=(LIMIT_POLICY,))
    status, body = await _issue(http, b, b.token("i-sweep"), "looping")
    assert status == 201
    old = next(r for r in b.rows("leases") if r["lease_id"] == body["lease_id"])
    # A request marks the old lease for replacement, then dies before revoking it.
    store = b.broker.components.ledgers.issuance
    from broker.leases import LeaseLimit

    ticket = await store.begin_issue(instance_id="i-sweep", issuer_name="dev",
                                     workload="payments", role="looping", kind="x509_certificate",
                                     limit=LeaseLimit(1, "revoke_oldest"))
    assert ticket.superseded == ((old["lease_id"], old["vault_lease_id"]),)
    await store.fail_issue(ticket.lease_id, "test_crash")
    assert vault.lease_exists(old["vault_lease_id"])
    worker = b.broker.components.worker
    assert await worker.sweep_superseded() == 0  # too young: its request may live
    await asyncio.sleep(b.settings.revocation.issuing_timeout_s + 0.3)
    assert await worker.sweep_superseded() == 1
    assert not vault.lease_exists(old["vault_lease_id"])
    row = next(r for r in b.rows("leases") if r["lease_id"] == old["lease_id"])
    assert row["state"] == "revoked"
