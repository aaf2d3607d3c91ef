"""Reconciliation on real OpenBao and PostgreSQL: expiry confirmed with Vault, a request
that died between Vault's answer and the store settled (its lease found and revoked),
orphans under the broker's paths reported and revoked, unseen instances terminated,
renewal within the role's max TTL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from broker.leases.migrations import sync_url
from tests.harness.api import bearer, issue, wait_job
from tests.harness.pki import Mount, mounted_pki, pki_role
from tests.harness.vault import VaultProbe
from tests.harness.wait import eventually

PARAMS = {"common_name": "{workload}.workload.internal"}


def _sql(b: Any, statement: str, **params: Any) -> None:
    engine = create_engine(sync_url(b.store_url))
    try:
        with engine.begin() as conn:
            conn.execute(text(statement), params)
    finally:
        engine.dispose()


async def _reconcile(http: Any, b: Any, **body: Any) -> dict[str, Any]:
    async with http.post(f"{b.url}/v1/admin/reconcile", json=body, headers=b.admin()) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


@pytest.fixture
def pki(vault: VaultProbe) -> Iterator[Mount]:
    with mounted_pki(vault, {"probe": pki_role(ttl="10m")}) as mount:
        yield mount


class OffsetClock:
    """The real time, plus an offset a test moves forward: the broker's clock runs ahead of
    Vault's, which is how a test ages leases Vault stamped with its own time."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> OffsetClock:
    return OffsetClock()


@pytest.fixture
async def b(make_broker, pki: Mount, clock: OffsetClock):
    """A broker whose only role issues from the test's own PKI mount, so that what the
    reconciler finds under its paths belongs to this test alone. Its issuing bound is 5 s
    and the allowed clock skew 5 s: a lease counts as unrecorded for good 10 s after Vault
    issued it, and a stuck row is settled once its whole window is that old."""
    roles = {"probe-cert": {"engine": "pki", "mount": pki.path, "vault_role": "probe",
                            "default_ttl": "10m", "max_ttl": "1h", "params": PARAMS}}
    return await make_broker(
        clock=clock,
        instance_policies=(pki.policy,),
        overrides={
            "roles": roles,
            "policy": {"rules": [{"name": "all", "allow": ["probe-cert"]}]},
            "reconcile": {"tick_s": 3600, "expiry_margin_s": 0},
        },
    )


def _root_issue(vault: VaultProbe, pki: Mount) -> str:
    """A lease under the broker's path that the broker never recorded."""
    status, body = vault.call("POST", f"{pki.path}/issue/probe",
                              {"common_name": "stray.workload.internal", "ttl": "10m"})
    assert status == 200, body
    return body["lease_id"]


async def test_a_request_that_died_after_vault_answered_is_settled_and_its_lease_revoked(
        b, http, vault, pki, clock):
    status, cred = await issue(http, b, "i-stuck", "probe-cert")
    assert status == 201
    # The crash, as the store saw it: the row was written, Vault issued, nothing recorded.
    lost = _root_issue(vault, pki)
    _sql(b, "UPDATE leases SET state = 'issuing', vault_lease_id = NULL, issued_at = NULL, "
            "expires_at = NULL WHERE lease_id = :lid", lid=cred["lease_id"])
    [row] = b.rows("leases")
    assert row["vault_path"] == f"{pki.path}/issue/probe"
    recorded = set(vault.leases_under(f"{pki.path}/issue/probe/"))

    # Young: its request might still record it, so nothing is touched.
    report = await _reconcile(http, b)
    assert (report["stuck_settled"], report["orphans"]) == (0, 0)
    assert len(recorded) == 2

    clock.advance(12)  # past the bound, but part of the row's window is still young
    report = await _reconcile(http, b)
    assert report["stuck_settled"] == 0 and report["stuck_waiting"] == [cred["lease_id"]]
    assert len(vault.leases_under(f"{pki.path}/issue/probe/")) == 2

    clock.advance(10)  # the whole window is older than the bound now
    report = await _reconcile(http, b)
    # The row's request window holds two unrecorded leases (the lost one and the one the
    # row had); both were issued for nobody the store knows, and both are revoked.
    assert report["stuck_settled"] == 1
    assert report["stuck_revoked_in_vault"] == 2
    assert report["stuck_waiting"] == [] and report["errors"] == {}
    assert not vault.lease_exists(lost)
    assert vault.leases_under(f"{pki.path}/issue/probe/") == []
    [row] = b.rows("leases")
    assert (row["state"], row["error_code"]) == ("abandoned", "stuck_issuing")
    [event] = [e for e in b.rows("audit_events") if e["action"] == "lease.stuck_settled"]
    assert event["detail"]["revoked_in_vault"] == 2
    assert sorted(event["detail"]["vault_lease_ids"]) == sorted(
        f"{pki.path}/issue/probe/{key}" for key in recorded)


async def test_a_stuck_row_of_another_window_leaves_unrelated_leases_alone(b, http, vault, pki):
    status, cred = await issue(http, b, "i-window", "probe-cert")
    assert status == 201
    _sql(b, "UPDATE leases SET state = 'issuing', vault_lease_id = NULL, "
            "created_at = created_at - interval '1 hour' WHERE lease_id = :lid",
         lid=cred["lease_id"])
    report = await _reconcile(http, b)
    # Nothing was issued in that hour-old window: the row is settled, the lease Vault
    # issued now (unrecorded, but young) is neither revoked nor reported.
    assert (report["stuck_settled"], report["stuck_revoked_in_vault"]) == (1, 0)
    assert report["orphans"] == 0
    assert len(vault.leases_under(f"{pki.path}/issue/probe/")) == 1


async def test_orphans_are_reported_then_revoked_on_request(b, http, vault, pki, clock):
    status, cred = await issue(http, b, "i-orphans", "probe-cert")
    assert status == 201
    stray = _root_issue(vault, pki)

    # Younger than the issuing bound: a request might still record it.
    report = await _reconcile(http, b)
    assert report["orphans"] == 0

    clock.advance(11)  # older than the issuing bound and the skew
    report = await _reconcile(http, b)
    assert report["orphans"] == 1 and report["orphans_revoked"] == 0
    assert report["orphan_sample"] == [stray]
    assert vault.lease_exists(stray)

    report = await _reconcile(http, b, revoke_orphans=True)
    assert (report["orphans"], report["orphans_revoked"]) == (1, 1)
    assert report["irrevocable"] == [] and report["errors"] == {}
    assert not vault.lease_exists(stray)
    [live] = b.rows("leases")
    assert live["state"] == "active" and vault.lease_exists(live["vault_lease_id"])
    # In the order they were written: a SELECT without ORDER BY promises none.
    assert [e["detail"]["revoked"] for e in sorted(b.rows("audit_events"), key=lambda e: e["seq"])
            if e["action"] == "reconcile.orphans"] == [0, 1]

    async with http.get(f"{b.url}/metrics") as resp:
        metrics = await resp.text()
    assert 'broker_reconcile_findings_total{finding="orphans"} 2.0' in metrics
    assert 'broker_reconcile_findings_total{finding="orphans_revoked"} 1.0' in metrics
    assert "broker_reconcile_orphans 0.0" in metrics


async def test_expiry_is_confirmed_with_vault(b, http, vault, pki):
    status, gone = await issue(http, b, "i-expiry", "probe-cert", ttl="2s")
    assert status == 201
    status, held = await issue(http, b, "i-expiry", "probe-cert")
    assert status == 201
    # The store is behind Vault on the second (as after a renewal it did not record).
    _sql(b, "UPDATE leases SET expires_at = expires_at - interval '1 hour' "
            "WHERE lease_id = :lid", lid=held["lease_id"])
    rows = {r["lease_id"]: r for r in b.rows("leases")}
    # Vault's own expiry takes the first one at its TTL.
    await eventually(lambda: not vault.lease_exists(rows[gone["lease_id"]]["vault_lease_id"]),
                     "Vault expired the 2s lease")

    # ... and the store's own expiry (stamped when the broker recorded it) has passed too.
    wait = (rows[gone["lease_id"]]["expires_at"] - datetime.now(UTC)).total_seconds()
    await asyncio.sleep(max(0.0, wait) + 0.2)
    report = await _reconcile(http, b)
    assert (report["expired"], report["expiry_corrected"]) == (1, 1)
    assert report["past_expiry_held"] == []
    after = {r["lease_id"]: r for r in b.rows("leases")}
    assert after[gone["lease_id"]]["state"] == "expired"
    assert after[held["lease_id"]]["state"] == "active"
    assert after[held["lease_id"]]["expires_at"] == rows[held["lease_id"]]["expires_at"] + \
        timedelta(hours=1) or abs(
            (after[held["lease_id"]]["expires_at"] - rows[held["lease_id"]]["expires_at"]
             - timedelta(hours=1)).total_seconds()) < 3
    assert vault.lease_exists(after[held["lease_id"]]["vault_lease_id"])
    async with http.get(f"{b.url}/v1/admin/leases", params={"state": "expired"},
                        headers=b.admin()) as resp:
        assert [x["lease_id"] for x in (await resp.json())["leases"]] == [gone["lease_id"]]


async def test_unseen_instances_are_terminated(make_broker, http):
    b = await make_broker(overrides={"reconcile": {"tick_s": 3600}},
                          issuer_overrides={"liveness": {"unseen_grace": "1h"}})
    for instance in ("i-seen", "i-unseen"):
        status, _ = await issue(http, b, instance, "dev-cert")
        assert status == 201
    await _reconcile(http, b)  # writes this replica's sightings first
    _sql(b, "UPDATE instances SET last_seen_at = now() - interval '2 hours' "
            "WHERE instance_id = 'i-unseen'")
    report = await _reconcile(http, b)
    assert report["unseen_terminated"] == ["i-unseen"]
    shown = await wait_job(http, b, "i-unseen")
    assert shown["state"] == "terminated", shown
    assert shown["job"]["requested_by"] == "liveness:unseen"
    assert [x["state"] for x in shown["leases"]] == ["revoked"]
    async with http.get(f"{b.url}/v1/instances/i-seen", headers=b.admin()) as resp:
        assert (await resp.json())["state"] == "active"


async def test_renewal_stays_within_max_ttl_and_says_when_it_nears_it(make_broker, http):
    b = await make_broker()
    status, cred = await issue(http, b, "i-renew", "dev-db", ttl="5m")
    assert status == 201 and cred["renewable"] is True
    token = b.token("i-renew")
    # The role's max TTL is an hour from issue: push issue time back 58 minutes.
    _sql(b, "UPDATE leases SET issued_at = issued_at - interval '58 minutes' "
            "WHERE lease_id = :lid", lid=cred["lease_id"])
    async with http.post(f"{b.url}/v1/leases/{cred['lease_id']}/renew", json={"ttl": "30m"},
                         headers=bearer(token)) as resp:
        renewed = await resp.json()
    assert resp.status == 200, renewed
    assert renewed["near_max_ttl"] is True
    assert renewed["expires_at"] <= renewed["max_expires_at"]
    _sql(b, "UPDATE leases SET issued_at = issued_at - interval '3 minutes' "
            "WHERE lease_id = :lid", lid=cred["lease_id"])
    async with http.post(f"{b.url}/v1/leases/{cred['lease_id']}/renew",
                         headers=bearer(b.token("i-renew"))) as resp:
        body = await resp.json()
    assert (resp.status, body["error"]["code"]) == (400, "lease_at_max_ttl")


async def test_an_instance_with_many_leases_is_confirmed_by_one_listing(make_broker, http,
                                                                      vault):
    b = await make_broker()
    leases = []
    for _ in range(20):  # past LIST_CONFIRM_MIN under one path
        status, cred = await issue(http, b, "i-many", "dev-cert")
        assert status == 201
        leases.append(cred["lease_id"])
    rows = {r["lease_id"]: r["vault_lease_id"] for r in b.rows("leases")}
    async with http.post(f"{b.url}/v1/instances/i-many/terminate", headers=b.admin()) as resp:
        assert resp.status == 202
    shown = await wait_job(http, b, "i-many")
    assert (shown["state"], shown["job"]["state"]) == ("terminated", "done")
    assert sorted(x["lease_id"] for x in shown["leases"] if x["state"] == "revoked") == \
        sorted(leases)
    assert not any(vault.lease_exists(rows[lid]) for lid in leases)
