"""Leases Vault forgot, on real OpenBao and PostgreSQL: never recorded as revoked.

Vault forgetting a lease is simulated without the broker: the test revokes it in Vault
directly with the root token, before the broker acts. Vault then answers as it would after
amnesia (a restored snapshot, replaced storage): it does not know the lease. That revocation
is real, though: for PKI it puts the serial on the CRL, so a broker with its direct checks
(what ``broker serve`` runs) would find the credential dead and record ``revoked``
(confirmed by the CRL), as one test here shows. The others run the broker without direct
checks (``checks=None``), where Vault's silence is all there is: every path that ends a
lease must then record ``lost`` (with its audit event and metric), never ``revoked`` or
``released``, while a lease Vault still knows is revoked as before, one the broker itself
sent a revocation for is revoked on a retry, and one past its expiry is ``expired``. True
amnesia (a credential that still works) is tests/fault/test_vault_amnesia.py."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from broker.leases.migrations import sync_url
from tests.harness.api import bearer, issue, terminate
from tests.harness.pki import Mount, mounted_pki, pki_role
from tests.harness.vault import VaultProbe

PARAMS = {"common_name": "{workload}.workload.internal"}


class OffsetClock:
    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


@pytest.fixture
def pki(vault: VaultProbe) -> Iterator[Mount]:
    with mounted_pki(vault, {"probe": pki_role(ttl="10m")}) as mount:
        yield mount


@pytest.fixture
def clock() -> OffsetClock:
    return OffsetClock()


@pytest.fixture
async def b(make_broker, pki: Mount, clock: OffsetClock):
    """A broker whose roles issue from the test's own PKI mount (one limited to a single
    lease per instance, replacing the oldest)."""
    base = {"engine": "pki", "mount": pki.path, "vault_role": "probe", "default_ttl": "10m",
            "max_ttl": "1h", "params": PARAMS}
    roles = {"probe-cert": base,
             "one-cert": {**base, "max_leases_per_instance": 1, "on_limit": "revoke_oldest"}}
    # No direct checks: the test's stand-in for amnesia (a root-token revocation) puts the
    # serial on the CRL, which the CRL check would rightly call dead (revoked, not lost).
    return await make_broker(
        clock=clock,
        checks=None,
        instance_policies=(pki.policy,),
        overrides={
            "roles": roles,
            "policy": {"rules": [{"name": "all", "allow": ["probe-cert", "one-cert"]}]},
            "reconcile": {"tick_s": 3600, "expiry_margin_s": 0},
        },
    )


def forget(vault: VaultProbe, vault_lease_id: str) -> None:
    """Vault forgets the lease, behind the broker's back."""
    status, body = vault.call("PUT", "sys/leases/revoke", {"lease_id": vault_lease_id,
                                                           "sync": True})
    assert status in (200, 204), body
    assert not vault.lease_exists(vault_lease_id)


def _lease(b: Any, lease_id: str) -> dict[str, Any]:
    [row] = [r for r in b.rows("leases") if r["lease_id"] == lease_id]
    return row


def _events(b: Any, action: str) -> list[dict[str, Any]]:
    return [e for e in b.rows("audit_events") if e["action"] == action]


def _sql(b: Any, statement: str, **params: Any) -> None:
    engine = create_engine(sync_url(b.store_url))
    try:
        with engine.begin() as conn:
            conn.execute(text(statement), params)
    finally:
        engine.dispose()


async def _lost_metric(http: Any, b: Any) -> dict[str, float]:
    async with http.get(f"{b.url}/metrics") as resp:
        body = await resp.text()
    out = {}
    for line in body.splitlines():
        if line.startswith("broker_leases_lost_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.removeprefix("broker_leases_lost_total")] = float(value)
    return out


async def _issued(http: Any, b: Any, instance: str, role: str = "probe-cert") -> dict[str, Any]:
    status, cred = await issue(http, b, instance, role)
    assert status == 201, cred
    return _lease(b, cred["lease_id"])


async def test_termination_records_a_forgotten_lease_lost_and_revokes_the_known_one(
        b, http, vault, pki):
    forgotten = await _issued(http, b, "i-amnesia")
    known = await _issued(http, b, "i-amnesia")
    assert forgotten["credential_ref"]["serial_number"]
    forget(vault, forgotten["vault_lease_id"])

    shown = await terminate(http, b, "i-amnesia")
    assert shown["job"]["state"] == "done"
    assert _lease(b, forgotten["lease_id"])["state"] == "lost"
    assert _lease(b, known["lease_id"])["state"] == "revoked"
    assert not vault.lease_exists(known["vault_lease_id"])
    [event] = _events(b, "lease.lost")
    assert event["lease_id"] == forgotten["lease_id"]
    assert event["outcome"] == "lost"
    detail = event["detail"]
    assert detail["why"] == "vault_unknown_before_revocation"
    assert detail["found_by"] == "revocation" and detail["engine"] == "pki"
    assert detail["vault_path"] == f"{pki.path}/issue/probe"
    assert detail["credential_ref"] == forgotten["credential_ref"]
    revoked_ids = {i for e in _events(b, "leases.revoked") for i in e["detail"]["lease_ids"]}
    assert forgotten["lease_id"] not in revoked_ids and known["lease_id"] in revoked_ids
    assert await _lost_metric(http, b) == {
        '{engine="pki",found_by="revocation",role="probe-cert"}': 1.0}
    async with http.get(f"{b.url}/v1/admin/leases", params={"state": "lost"},
                        headers=b.admin()) as resp:
        listed = (await resp.json())["leases"]
    assert [(x["lease_id"], x["vault_path"], x["credential_ref"]) for x in listed] == [
        (forgotten["lease_id"], forgotten["vault_path"], forgotten["credential_ref"])]


async def test_with_direct_checks_a_pki_lease_revoked_behind_our_back_is_revoked_by_crl(
        make_broker, pki, http, vault):
    """What ``broker serve`` runs: a PKI lease revoked in Vault by someone else has its
    serial on the CRL, so it is dead, not lost: recorded revoked, confirmed by the CRL."""
    base = {"engine": "pki", "mount": pki.path, "vault_role": "probe", "default_ttl": "10m",
            "max_ttl": "1h", "params": PARAMS}
    b = await make_broker(
        instance_policies=(pki.policy,),
        overrides={"roles": {"probe-cert": base},
                   "policy": {"rules": [{"name": "all", "allow": ["probe-cert"]}]},
                   "reconcile": {"tick_s": 3600, "expiry_margin_s": 0}},
    )
    lease = await _issued(http, b, "i-crl")
    forget(vault, lease["vault_lease_id"])

    shown = await terminate(http, b, "i-crl")
    assert shown["job"]["state"] == "done"
    assert _lease(b, lease["lease_id"])["state"] == "revoked"
    assert _events(b, "lease.lost") == []
    [event] = [e for e in _events(b, "lease.revoked") if e["lease_id"] == lease["lease_id"]]
    assert event["detail"]["confirmed_by"] == "crl"
    assert event["detail"]["vault_knew"] is False


async def test_a_retry_after_our_revocation_was_sent_records_revoked_not_lost(b, http, vault):
    """A worker that stamped revoke_sent_at and sent the revocation, then died (or Vault
    went away before it confirmed): on the retry Vault not knowing the lease is ours."""
    lease = await _issued(http, b, "i-retry")
    _sql(b, "UPDATE leases SET revoke_sent_at = :now WHERE lease_id = :lid",
         now=datetime.now(UTC), lid=lease["lease_id"])
    forget(vault, lease["vault_lease_id"])  # the revocation it sent took effect

    await terminate(http, b, "i-retry")
    assert _lease(b, lease["lease_id"])["state"] == "revoked"
    assert _events(b, "lease.lost") == []


async def test_release_of_a_forgotten_lease_answers_204_and_records_lost(b, http, vault,
                                                                          caplog):
    caplog.set_level(logging.INFO, logger="broker.api")
    lease = await _issued(http, b, "i-release")
    forget(vault, lease["vault_lease_id"])
    async with http.delete(f"{b.url}/v1/leases/{lease['lease_id']}",
                           headers=bearer(b.token("i-release"))) as resp:
        assert resp.status == 204, await resp.text()
    assert _lease(b, lease["lease_id"])["state"] == "lost"
    [event] = _events(b, "lease.lost")
    assert event["detail"]["found_by"] == "release"
    assert _released_states(caplog) == ["lost"]  # the log line says so, not "released" alone
    # Idempotent: the workload's retry is answered the same.
    async with http.delete(f"{b.url}/v1/leases/{lease['lease_id']}",
                           headers=bearer(b.token("i-release"))) as resp:
        assert resp.status == 204
    # And a lease Vault still knows is released as before.
    kept = await _issued(http, b, "i-release")
    async with http.delete(f"{b.url}/v1/leases/{kept['lease_id']}",
                           headers=bearer(b.token("i-release"))) as resp:
        assert resp.status == 204
    assert _lease(b, kept["lease_id"])["state"] == "released"
    assert not vault.lease_exists(kept["vault_lease_id"])
    assert _released_states(caplog) == ["lost", "already ended", "released"]


def _released_states(caplog: Any) -> list[str]:
    return [r.__dict__["state"] for r in caplog.records if r.getMessage() == "lease released"]


async def test_lease_limit_replacement_of_a_forgotten_lease_records_lost(b, http, vault):
    old = await _issued(http, b, "i-limit", "one-cert")
    forget(vault, old["vault_lease_id"])
    status, cred = await issue(http, b, "i-limit", "one-cert")
    assert status == 201, cred
    assert cred["lease_limit"]["revoked"] == []
    assert cred["lease_limit"]["revocation_pending"] == []
    assert cred["lease_limit"]["lost"] == [old["lease_id"]]
    assert _lease(b, old["lease_id"])["state"] == "lost"
    assert _events(b, "lease.lost")[0]["detail"]["found_by"] == "lease_limit"
    # A known one is replaced (revoked) as before.
    status, again = await issue(http, b, "i-limit", "one-cert")
    assert status == 201
    assert again["lease_limit"]["revoked"] == [cred["lease_id"]]
    assert _lease(b, cred["lease_id"])["state"] == "revoked"


async def test_the_reconciler_finds_a_forgotten_live_lease_lost(b, http, vault):
    forgotten = await _issued(http, b, "i-recon")
    known = await _issued(http, b, "i-recon")
    forget(vault, forgotten["vault_lease_id"])
    async with http.post(f"{b.url}/v1/admin/reconcile", json={}, headers=b.admin()) as resp:
        assert resp.status == 200
        report = await resp.json()
    assert report["lost"] == [forgotten["lease_id"]], report
    assert _lease(b, forgotten["lease_id"])["state"] == "lost"
    assert _lease(b, known["lease_id"])["state"] == "active"
    [event] = _events(b, "lease.lost")
    assert event["detail"]["why"] == "missing_from_vault_listing"
    assert event["detail"]["found_by"] == "reconciler"


async def test_a_lease_gone_past_its_expiry_is_expired_not_lost(b, http, vault, clock):
    lease = await _issued(http, b, "i-expired")
    forget(vault, lease["vault_lease_id"])
    clock.offset = timedelta(minutes=11)  # past its 10 minutes, by the broker's clock
    async with http.post(f"{b.url}/v1/admin/reconcile", json={}, headers=b.admin()) as resp:
        report = await resp.json()
    assert report["lost"] == [] and report["expired"] == 1, report
    assert _lease(b, lease["lease_id"])["state"] == "expired"
    assert _events(b, "lease.lost") == []


async def test_renewal_of_a_forgotten_lease_answers_409_lease_lost(make_broker, http, vault):
    b = await make_broker(checks=None)  # as ``b``: the stand-in for amnesia is a revocation
    lease = await _issued(http, b, "i-renew", "dev-db")
    assert lease["renewable"] and lease["credential_ref"]["username"]
    forget(vault, lease["vault_lease_id"])
    async with http.post(f"{b.url}/v1/leases/{lease['lease_id']}/renew",
                         headers=bearer(b.token("i-renew"))) as resp:
        body = await resp.json()
        assert resp.status == 409, body
    assert body["error"]["code"] == "lease_lost"
    assert _lease(b, lease["lease_id"])["state"] == "lost"
    assert _events(b, "lease.lost")[0]["detail"]["found_by"] == "renewal"


async def test_the_sweep_of_a_replaced_lease_vault_forgot_records_lost(b, http, vault):
    """A request marked the old lease for replacement and died before revoking it; Vault
    forgot the lease meanwhile: the worker's sweep records it lost, not revoked."""
    from broker.leases import LeaseLimit

    old = await _issued(http, b, "i-sweep", "one-cert")
    store = b.broker.components.ledgers.issuance
    ticket = await store.begin_issue(instance_id="i-sweep", issuer_name="dev",
                                     workload="payments", role="one-cert",
                                     kind="x509_certificate", limit=LeaseLimit(1, "revoke_oldest"))
    assert ticket.superseded == ((old["lease_id"], old["vault_lease_id"]),)
    await store.fail_issue(ticket.lease_id, "test_crash")
    forget(vault, old["vault_lease_id"])
    _sql(b, "UPDATE leases SET updated_at = :t WHERE lease_id = :lid",
         t=datetime.now(UTC) - timedelta(hours=1), lid=old["lease_id"])
    assert await b.broker.components.worker.sweep_superseded() == 0  # none revoked by us
    assert _lease(b, old["lease_id"])["state"] == "lost"
    [event] = _events(b, "lease.lost")
    assert event["detail"]["found_by"] == "lease_limit"
