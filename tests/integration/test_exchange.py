"""The whole story on real components: OpenBao dev server, real PostgreSQL (as lease store
and as the database whose logins Vault mints), the dev issuer's JWKS over HTTP."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tests.harness.api import bearer, issue, wait_job
from tests.harness.databases import store_without_refs
from tests.harness.pgauth import scram_password_matches


def _login(pg, user: str, password: str) -> str:
    with psycopg.connect(pg.url("postgres", user=user), password=password,
                         connect_timeout=5) as conn:
        return conn.execute("SELECT current_user").fetchone()[0]


@pytest.mark.parametrize("store", ["postgresql", "sqlite"])
async def test_database_login_lives_until_the_instance_is_terminated(
        make_broker, http, pg, vault, store):
    b = await make_broker(store)
    status, cred = await issue(http, b, "i-db-1", "dev-db", ttl="5m")
    assert status == 201, cred
    assert set(cred) == {"lease_id", "instance_id", "workload", "role", "kind", "data",
                         "issued_at", "expires_at", "renewable", "leased", "lease_limit"}
    assert (cred["instance_id"], cred["workload"], cred["role"], cred["kind"]) == (
        "i-db-1", "payments", "dev-db", "database_login")
    assert cred["renewable"] is True
    user, password = cred["data"]["username"], cred["data"]["password"]
    lifetime = (datetime.fromisoformat(cred["expires_at"])
                - datetime.fromisoformat(cred["issued_at"])).total_seconds()
    assert 280 <= lifetime <= 300  # the requested 5m, not the Vault role's 10m default

    # The login is real: PostgreSQL holds this password, and the user can run a query.
    assert pg.role_exists(user)
    assert scram_password_matches(pg.admin_url, user, password)
    assert not scram_password_matches(pg.admin_url, user, password + "x")
    assert _login(pg, user, password) == user

    # The store knows the lease and the instance token by accessor, never the secrets.
    [lease] = b.rows("leases")
    assert lease["state"] == "active" and lease["vault_lease_id"].startswith(
        "database/creds/dev-db/")
    [tok] = b.rows("instance_tokens")
    assert vault.token_meta(tok["accessor"])["instance_id"] == "i-db-1"
    dump, refs = store_without_refs(b)
    assert password not in dump and user not in dump
    assert {"username": user} in refs and password not in repr(refs)

    async with http.post(f"{b.url}/v1/instances/i-db-1/terminate", headers=b.admin()) as resp:
        assert resp.status == 202
        accepted = await resp.json()
    assert accepted["instance_id"] == "i-db-1"
    assert accepted["job"]["state"] in ("pending", "running", "done")
    shown = await wait_job(http, b, "i-db-1")
    assert shown["state"] == "terminated" and shown["job"]["state"] == "done"
    assert [x["state"] for x in shown["leases"]] == ["revoked"]

    assert not pg.role_exists(user)
    assert not vault.lease_exists(lease["vault_lease_id"])
    assert not vault.accessor_alive(tok["accessor"])
    with pytest.raises(psycopg.OperationalError):
        _login(pg, user, password)

    status, body = await issue(http, b, "i-db-1", "dev-db")
    assert (status, body["error"]["code"]) == (409, "instance_terminated")

    # Idempotent: terminating again returns the same finished job.
    async with http.post(f"{b.url}/v1/instances/i-db-1/terminate", headers=b.admin()) as resp:
        again = await resp.json()
    assert resp.status == 202 and again["job"]["job_id"] == accepted["job"]["job_id"]
    assert again["job"]["state"] == "done"


async def test_certificate_chains_to_the_pki_ca_and_expires_within_the_role_ttl(
        broker, http, vault_setup, vault):
    status, cred = await issue(http, broker, "i-cert-1", "dev-cert", ttl="2h")
    assert status == 201, cred
    assert cred["kind"] == "x509_certificate" and cred["renewable"] is False
    cert = x509.load_pem_x509_certificate(cred["data"]["certificate"].encode())
    ca = x509.load_pem_x509_certificate(vault_setup.ca_pem.encode())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == \
        "payments.workload.internal"
    # 2h was asked; the role caps at 1h.
    validity = cert.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(minutes=58) < validity <= timedelta(hours=1, seconds=5)
    expires = datetime.fromisoformat(cred["expires_at"])
    assert abs((expires - cert.not_valid_after_utc).total_seconds()) < 5
    key = cred["data"]["private_key"]
    assert "PRIVATE KEY" in key
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    [lease] = broker.rows("leases")
    assert vault.lease_exists(lease["vault_lease_id"])
    assert key not in repr(broker.rows("leases")) + repr(broker.rows("audit_events"))


async def test_renew_extends_within_the_max_ttl_and_release_revokes(broker, http, pg, vault):
    status, cred = await issue(http, broker, "i-renew", "dev-db", ttl="2m")
    assert status == 201
    lease_id = cred["lease_id"]
    token = broker.token("i-renew")
    async with http.post(f"{broker.url}/v1/leases/{lease_id}/renew", headers=bearer(token),
                         json={"ttl": "20m"}) as resp:
        assert resp.status == 200, await resp.text()
        renewed = await resp.json()
    new_expiry = datetime.fromisoformat(renewed["expires_at"])
    assert timedelta(minutes=19) < new_expiry - datetime.now(UTC) <= timedelta(minutes=20)
    max_expiry = datetime.fromisoformat(renewed["max_expires_at"])
    assert max_expiry - datetime.fromisoformat(cred["issued_at"]) == timedelta(hours=1)
    assert renewed["near_max_ttl"] is False
    async with http.get(f"{broker.url}/v1/admin/leases?instance=i-renew",
                        headers=broker.admin()) as resp:
        [listed] = (await resp.json())["leases"]
    assert datetime.fromisoformat(listed["expires_at"]) == new_expiry

    # Another instance cannot renew or release it, and learns nothing about it.
    other = bearer(broker.token("i-other"))
    async with http.post(f"{broker.url}/v1/leases/{lease_id}/renew", headers=other) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "lease_not_found"
    async with http.delete(f"{broker.url}/v1/leases/{lease_id}", headers=other) as resp:
        assert resp.status == 404

    async with http.delete(f"{broker.url}/v1/leases/{lease_id}", headers=bearer(token)) as resp:
        assert resp.status == 204
    assert not pg.role_exists(cred["data"]["username"])
    [lease] = broker.rows("leases")
    assert lease["state"] == "released" and not vault.lease_exists(lease["vault_lease_id"])
    async with http.delete(f"{broker.url}/v1/leases/{lease_id}", headers=bearer(token)) as resp:
        assert resp.status == 204  # idempotent
    async with http.post(f"{broker.url}/v1/leases/{lease_id}/renew",
                         headers=bearer(token)) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "lease_not_active"

    # Longer than the Vault role's 10m default, within the broker role's 1h: granted as asked.
    status, longer = await issue(http, broker, "i-renew", "dev-db", ttl="25m")
    assert status == 201
    granted = (datetime.fromisoformat(longer["expires_at"])
               - datetime.fromisoformat(longer["issued_at"])).total_seconds()
    assert 1490 <= granted <= 1500
    status, pki = await issue(http, broker, "i-renew", "dev-cert")
    async with http.post(f"{broker.url}/v1/leases/{pki['lease_id']}/renew",
                         headers=bearer(token)) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "lease_not_renewable"


async def test_one_instance_token_serves_every_credential_of_the_instance(broker, http, vault):
    for role in ("dev-cert", "dev-db", "dev-cert"):
        status, _ = await issue(http, broker, "i-shared", role)
        assert status == 201
    tokens = broker.rows("instance_tokens")
    assert len(tokens) == 1
    leases = broker.rows("leases")
    assert {x["token_accessor"] for x in leases} == {tokens[0]["accessor"]}


async def test_admin_queries_filter_and_paginate(broker, http):
    for instance, role in (("i-a", "dev-cert"), ("i-a", "dev-db"), ("i-b", "dev-cert")):
        status, _ = await issue(http, broker, instance, role)
        assert status == 201
    async with http.get(f"{broker.url}/v1/admin/leases?instance=i-a",
                        headers=broker.admin()) as resp:
        page = await resp.json()
    assert sorted(x["role"] for x in page["leases"]) == ["dev-cert", "dev-db"]
    async with http.get(f"{broker.url}/v1/admin/leases?role=dev-cert&state=active",
                        headers=broker.admin()) as resp:
        page = await resp.json()
    assert sorted(x["instance_id"] for x in page["leases"]) == ["i-a", "i-b"]
    seen, after = [], None
    while True:
        q = "limit=1" + (f"&after={after}" if after else "")
        async with http.get(f"{broker.url}/v1/admin/leases?{q}", headers=broker.admin()) as resp:
            page = await resp.json()
        seen += [x["lease_id"] for x in page["leases"]]
        after = page["next"]
        if not after:
            break
    assert len(seen) == len(set(seen)) == 3
    async with http.get(f"{broker.url}/v1/admin/leases?state=bogus",
                        headers=broker.admin()) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_query"
    async with http.get(f"{broker.url}/v1/instances/i-none", headers=broker.admin()) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "instance_not_found"


async def test_operations_endpoints(broker, http):
    async with http.get(f"{broker.url}/healthz") as resp:
        assert resp.status == 200 and (await resp.json()) == {"status": "ok"}
    async with http.get(f"{broker.url}/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json()) == {"status": "ready", "checks": {"store": "ok",
                                                                     "vault": "ok"}}
    await issue(http, broker, "i-metrics", "dev-cert")
    async with http.get(f"{broker.url}/metrics") as resp:
        text = await resp.text()
    assert resp.status == 200
    assert 'broker_credentials_issued_total{kind="x509_certificate",role="dev-cert"} 1.0' in text
    assert 'broker_leases{engine="pki",role="dev-cert",state="active"} 1.0' in text
    assert "broker_revocation_queue_depth 0.0" in text
    async with http.get(f"{broker.url}/openapi.json") as resp:
        doc = await resp.json()
    assert doc["openapi"].startswith("3.") and "/v1/credentials" in doc["paths"]


async def test_terminating_an_unknown_instance_tombstones_it(broker, http):
    async with http.post(f"{broker.url}/v1/instances/i-never-seen/terminate",
                         headers=broker.admin()) as resp:
        assert resp.status == 202
    shown = await wait_job(http, broker, "i-never-seen")
    assert shown["state"] == "terminated" and shown["leases"] == []
    status, body = await issue(http, broker, "i-never-seen", "dev-cert")
    assert (status, body["error"]["code"]) == (409, "instance_terminated")


async def test_refusals_are_counted_by_reason_and_issuer(broker, http, issuer):
    import time as _time

    old = issuer.mint(instance="i-m", workload="payments", now=_time.time() - 3600, ttl=60)
    for token in (old, old, "garbage"):
        async with http.post(f"{broker.url}/v1/credentials", json={"role": "dev-cert"},
                             headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 401
    async with http.get(f"{broker.url}/metrics") as resp:
        text = await resp.text()
    assert 'broker_requests_refused_total{code="token_expired",issuer="dev"} 2.0' in text
    assert 'broker_requests_refused_total{code="token_malformed",issuer=""} 1.0' in text
