"""The reconciler's expiry step on real OpenBao and PostgreSQL, with the direct checks
wired as ``broker serve`` wires them: a database lease Vault forgot and whose login still
exists past its expiry is ``lost`` (Vault never ended it), while one whose login is gone
is ``expired``. Vault forgetting a lease is made by revoking it with the root token; the
surviving login is then created again by hand, as a restored Vault leaves it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from broker.app import Broker, assemble
from broker.leases.migrations import migrate
from tests.conftest import RunningBroker, broker_settings
from tests.harness.api import issue
from tests.harness.vault import VaultProbe


class OffsetClock:
    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


@pytest.fixture
def clock() -> OffsetClock:
    return OffsetClock()


@pytest.fixture
async def checked(workdir: Path, pg: Any, bao: Any, vault_setup: Any, issuer: Any,
                  clock: OffsetClock) -> AsyncIterator[RunningBroker]:
    """A broker with the direct checks on (dev-db checked through PostgreSQL's own
    superuser here: trust on loopback, it only reads pg_roles)."""
    if not vault_setup.database_configured:
        pytest.skip("the test Vault has no database engine")
    name = await asyncio.to_thread(pg.create_database)
    store_url = pg.url(name)
    broker: Broker | None = None
    try:
        await asyncio.to_thread(migrate, store_url)
        dev_db = {"engine": "database", "mount": "database", "vault_role": "dev-db",
                  "default_ttl": "10m", "max_ttl": "1h", "check": {"url": pg.url("postgres")}}
        settings = broker_settings(
            store_url=store_url, bao=bao, setup=vault_setup, issuer=issuer,
            extra_roles={"dev-db": dev_db},
            overrides={"reconcile": {"tick_s": 3600, "expiry_margin_s": 0}})
        broker = Broker(assemble(settings, clock=clock, checks="direct"))
        await broker.start()
        yield RunningBroker(broker, settings, store_url, issuer)
    finally:
        if broker is not None:
            await broker.stop()
        await asyncio.to_thread(pg.drop_database, name)


@pytest.fixture
def logins(pg: Any) -> Iterator[list[str]]:
    """PostgreSQL logins the test creates by hand, dropped at the end."""
    made: list[str] = []
    yield made
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        for user in made:
            conn.execute(f'DROP ROLE IF EXISTS "{user}"')


def _lease(b: RunningBroker, lease_id: str) -> dict[str, Any]:
    [row] = [r for r in b.rows("leases") if r["lease_id"] == lease_id]
    return row


def _forget(vault: VaultProbe, vault_lease_id: str) -> None:
    status, body = vault.call("PUT", "sys/leases/revoke", {"lease_id": vault_lease_id,
                                                           "sync": True})
    assert status in (200, 204), body
    assert not vault.lease_exists(vault_lease_id)


async def test_a_forgotten_lease_whose_login_outlives_its_expiry_is_lost(
        checked, http, vault, pg, clock, logins):
    b = checked
    leases = {}
    for instance in ("i-alive-login", "i-dead-login"):
        status, cred = await issue(http, b, instance, "dev-db")
        assert status == 201, cred
        leases[instance] = _lease(b, cred["lease_id"])
    for lease in leases.values():
        _forget(vault, lease["vault_lease_id"])  # Vault drops the login with the lease
    # A Vault restored from an older snapshot would have left this one's login in place.
    user = leases["i-alive-login"]["credential_ref"]["username"]
    logins.append(user)
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{user}" LOGIN')

    clock.offset = timedelta(minutes=11)  # both past their 10 minutes, by the broker's clock
    async with http.post(f"{b.url}/v1/admin/reconcile", json={}, headers=b.admin()) as resp:
        assert resp.status == 200
        report = await resp.json()
    alive, dead = leases["i-alive-login"]["lease_id"], leases["i-dead-login"]["lease_id"]
    assert report["lost"] == [alive], report
    assert report["expired"] == 1, report
    assert _lease(b, alive)["state"] == "lost"
    assert _lease(b, dead)["state"] == "expired"
    [event] = [e for e in b.rows("audit_events") if e["action"] == "lease.lost"]
    assert event["lease_id"] == alive
    assert event["detail"]["why"] == "credential_alive_past_expiry"
    assert event["detail"]["credential_ref"] == {"username": user}
