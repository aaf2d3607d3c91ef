"""Vault amnesia: OpenBao on persistent storage, restored from a copy taken before some of
the broker's leases were issued. "Unknown lease" then proves nothing: every lease Vault
forgot is reported ``lost`` (its credential may still work), unless a direct check
confirms it dead; never ``revoked`` on Vault's word alone. Every lease Vault still knew
is revoked and its login fails. With the PostgreSQL checker set on the role, a forgotten
login whose role still exists stays lost (and does still work), one whose role an
operator dropped is confirmed dead (``revoked``, confirmed by the check); a forgotten
certificate is not on the CRL and stays lost.

The steps: issue leases for instance A; stop OpenBao and copy its storage; start and
unseal; issue more for A and some for B; stop; restore the copy; start and unseal;
terminate A with ``brokerctl revoke --wait`` and B through the API.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from cryptography import x509

from broker.dev.environment import dev_settings_dict
from broker.dev.issuer import DevIssuer
from broker.leases.migrations import migrate
from broker.secret import Secret
from broker.vault.bootstrap import DevVault, bootstrap_dev
from broker.vault.crl import parse_serial
from tests.conftest import ADMIN_SHA, ADMIN_TOKEN
from tests.harness.brokers import TOKEN_REF, BrokerProcess, wait_ready
from tests.harness.openbao_persistent import PersistentOpenBao
from tests.harness.postgres import PgServer
from tests.harness.vault import VaultProbe
from tests.harness.wait import eventually

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHECKER_ENV = "TEST_PG_CHECKER_PASSWORD"
CHECKER_PASSWORD = "chk-" + uuid.uuid4().hex[:12]
LIVE = ("active", "revoking", "issuing")


class Amnesia:
    """The pieces of one run: OpenBao, its root probe, the broker process, the store."""

    def __init__(self, bao: PersistentOpenBao, setup: DevVault, broker: BrokerProcess,
                 store_url: str, issuer: DevIssuer, pg: PgServer) -> None:
        self.bao = bao
        self.setup = setup
        self.broker = broker
        self.store_url = store_url
        self.issuer = issuer
        self.pg = pg
        self.vault = VaultProbe(bao.addr, bao.root_token)
        self.http: aiohttp.ClientSession | None = None
        self.usernames: list[str] = []  # every login issued, for the clean-up

    async def issue(self, instance: str, role: str) -> dict[str, Any]:
        assert self.http is not None
        token = self.issuer.mint(instance=instance, workload="payments")
        async with self.http.post(f"{self.broker.url}/v1/credentials", json={"role": role},
                                  headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 201, await resp.text()
            cred = dict(await resp.json())
        if cred["kind"] == "database_login":
            self.usernames.append(cred["data"]["username"])
        return cred

    async def instance(self, instance: str) -> dict[str, Any]:
        assert self.http is not None
        async with self.http.get(f"{self.broker.url}/v1/instances/{instance}",
                                 headers=ADMIN) as resp:
            assert resp.status == 200, await resp.text()
            return dict(await resp.json())

    async def vault_restarted(self, restore: Path | None = None) -> None:
        """Stop OpenBao, restore ``restore`` if given, start and unseal it, and wait for
        the broker to see it ready again."""
        await asyncio.to_thread(self.bao.stop)
        if restore is not None:
            await asyncio.to_thread(self.bao.restore_storage, restore)
        await asyncio.to_thread(self.bao.start)
        await asyncio.to_thread(self.bao.unseal)
        assert self.broker.proc is not None
        await wait_ready(self.broker.url, self.broker.proc, 60, self.broker.log)


def can_log_in(pg: PgServer, cred: dict[str, Any]) -> bool:
    try:
        with psycopg.connect(pg.url("postgres", user=cred["data"]["username"]),
                             password=cred["data"]["password"], connect_timeout=5) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def crl_serials(vault: VaultProbe) -> set[int]:
    status, body = vault.call("GET", "pki/cert/crl")
    assert status == 200, body
    crl = x509.load_pem_x509_crl(body["data"]["certificate"].encode())
    return {entry.serial_number for entry in crl}


@pytest.fixture
def checker(pg: PgServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The read-only login the broker checks PostgreSQL roles with; its password reaches
    the broker through the environment (``${TEST_PG_CHECKER_PASSWORD}``)."""
    name = f"checker_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE \"{name}\" LOGIN PASSWORD '{CHECKER_PASSWORD}' "
                     "NOSUPERUSER NOCREATEDB NOCREATEROLE")
    monkeypatch.setenv(CHECKER_ENV, CHECKER_PASSWORD)
    yield name
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute(f'DROP ROLE IF EXISTS "{name}"')


@pytest.fixture
async def amnesia(workdir: Path, pg: PgServer, issuer: DevIssuer,
                  checker: str) -> AsyncIterator[Amnesia]:
    base = workdir / f"amnesia-{uuid.uuid4().hex[:8]}"
    bao = PersistentOpenBao(base / "openbao")
    store = await asyncio.to_thread(pg.create_database)
    broker: BrokerProcess | None = None
    run: Amnesia | None = None
    try:
        await asyncio.to_thread(bao.start)
        await asyncio.to_thread(bao.initialize)
        setup = await asyncio.to_thread(bootstrap_dev, bao.addr, bao.root_token,
                                        postgres_url=pg.admin_url)
        assert setup.database_configured
        store_url = pg.url(store)
        await asyncio.to_thread(migrate, store_url)
        data = dev_settings_dict(
            vault_addr=bao.addr, broker_token=TOKEN_REF, issuer=issuer.issuer,
            jwks_uri=f"{issuer.issuer}/.well-known/jwks.json", store_url=store_url,
            admin_token_sha256=ADMIN_SHA, with_database=True, port=0)
        for role in data["roles"].values():
            role["max_leases_per_instance"] = 100
        data["roles"]["dev-db"]["check"] = {
            "url": pg.url("postgres", user=checker), "password": "${" + CHECKER_ENV + "}"}
        data["revocation"] = {"tick_s": 0.2, "backoff_base_s": 0.2, "backoff_max_s": 2.0,
                              "claim_timeout_s": 5, "issuing_timeout_s": 5}
        # The termination paths find the forgotten leases, not a reconcile pass that
        # happens to fall between the restore and the termination on a slow machine.
        data["reconcile"] = {"tick_s": 3600}
        base.mkdir(parents=True, exist_ok=True)
        broker = BrokerProcess.configure(base, "broker", data, Secret(setup.broker_token))
        await broker.start(timeout=60)
        run = Amnesia(bao, setup, broker, store_url, issuer, pg)
        async with aiohttp.ClientSession() as http:
            run.http = http
            yield run
    finally:
        if broker is not None:
            broker.stop()
        await asyncio.to_thread(bao.stop)
        # Logins a forgotten OpenBao created are nobody's to revoke: drop them here.
        with psycopg.connect(pg.admin_url, autocommit=True) as conn:
            for name in run.usernames if run is not None else []:
                conn.execute(f'DROP ROLE IF EXISTS "{name}"')
        await asyncio.to_thread(pg.drop_database, store)


async def test_every_lease_vault_forgot_is_lost_and_every_one_it_knew_is_revoked(
        amnesia: Amnesia, pg: PgServer) -> None:
    run = amnesia
    # Before the copy: A has a login and a certificate Vault will remember.
    known = {"a-db": await run.issue("i-amn-a", "dev-db"),
             "a-cert": await run.issue("i-amn-a", "dev-cert")}
    await asyncio.to_thread(run.bao.stop)
    copy = await asyncio.to_thread(run.bao.copy_storage, "before-b")
    await run.vault_restarted()

    # After the copy: more for A, and B's first ones. Vault will forget all of these.
    forgotten = {"a-db-2": await run.issue("i-amn-a", "dev-db"),
                 "a-cert-2": await run.issue("i-amn-a", "dev-cert"),
                 "b-db": await run.issue("i-amn-b", "dev-db"),
                 "b-cert": await run.issue("i-amn-b", "dev-cert")}
    # ... and one whose PostgreSQL role an operator will have dropped by hand.
    dropped = await run.issue("i-amn-b", "dev-db")
    for cred in (*known.values(), *forgotten.values(), dropped):
        shown = await run.instance(cred["instance_id"])
        states = {x["lease_id"]: x["state"] for x in shown["leases"]}
        assert states[cred["lease_id"]] == "active"

    await run.vault_restarted(restore=copy)
    vault_ids = {x["lease_id"]: x["vault_lease_id"]
                 for i in ("i-amn-a", "i-amn-b") for x in (await run.instance(i))["leases"]}
    for name, cred in known.items():
        assert run.vault.lease_exists(vault_ids[cred["lease_id"]]), name
    for name, cred in (*forgotten.items(), ("dropped", dropped)):
        assert not run.vault.lease_exists(vault_ids[cred["lease_id"]]), name
    # The forgotten logins still work: nothing in PostgreSQL was undone.
    assert can_log_in(pg, forgotten["a-db-2"]) and can_log_in(pg, forgotten["b-db"])
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute(f'DROP ROLE "{dropped["data"]["username"]}"')

    # Terminate A with brokerctl (it waits, and says lost leases are not "done") ...
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli.ctl", "revoke", "--instance", "i-amn-a", "--wait",
        env={**os.environ, "BROKER_URL": run.broker.url, "BROKER_ADMIN_TOKEN": ADMIN_TOKEN},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 1, (proc.returncode, out.decode(), err.decode())
    assert "NOT DONE: 2 lease(s) LOST" in out.decode(), out.decode()  # a-db-2, a-cert-2
    # ... and B through the API.
    assert run.http is not None
    async with run.http.post(f"{run.broker.url}/v1/instances/i-amn-b/terminate",
                             headers=ADMIN) as resp:
        assert resp.status == 202, await resp.text()

    async def settled(instance: str) -> dict[str, Any] | None:
        shown = await run.instance(instance)
        job = shown.get("job") or {}
        if job.get("state") in ("pending", "running") or any(
                x["state"] in LIVE for x in shown["leases"]):
            return None
        return shown

    shown = {i: await eventually(lambda i=i: settled(i), f"{i} terminated", timeout=90)
             for i in ("i-amn-a", "i-amn-b")}
    # Both jobs end done: the tokens Vault forgot are not retried until the jobs fail.
    assert {i: s["job"]["state"] for i, s in shown.items()} == {
        "i-amn-a": "done", "i-amn-b": "done"}
    leases = {x["lease_id"]: x for s in shown.values() for x in s["leases"]}
    # Both jobs finish: lost leases (and a token Vault forgot) end the job, not fail it.
    assert {i: s["job"]["state"] for i, s in shown.items()} == {
        "i-amn-a": "done", "i-amn-b": "done"}, shown

    def state(cred: dict[str, Any]) -> str:
        return str(leases[cred["lease_id"]]["state"])

    # Every lease Vault knew: revoked, and dead.
    assert {n: state(c) for n, c in known.items()} == {n: "revoked" for n in known}
    assert not can_log_in(pg, known["a-db"])
    assert parse_serial(known["a-cert"]["data"]["serial_number"]) in crl_serials(run.vault)
    # Every lease Vault forgot: lost, none revoked; still valid where the check could say.
    assert {n: state(c) for n, c in forgotten.items()} == {n: "lost" for n in forgotten}
    assert can_log_in(pg, forgotten["a-db-2"]) and can_log_in(pg, forgotten["b-db"])
    serials = crl_serials(run.vault)
    for name in ("a-cert-2", "b-cert"):
        assert parse_serial(forgotten[name]["data"]["serial_number"]) not in serials, name
    # The one whose role the operator dropped: the checker confirmed it dead.
    assert state(dropped) == "revoked"
    # What an operator needs to clean up by hand is on each lost lease.
    for name, cred in forgotten.items():
        ref = leases[cred["lease_id"]].get("credential_ref") or {}
        if cred["kind"] == "database_login":
            assert ref.get("username") == cred["data"]["username"], name
        else:
            assert parse_serial(ref.get("serial_number")) == parse_serial(
                cred["data"]["serial_number"]), name
    # ... and in the audit: one lease.lost event per lost lease.
    with psycopg.connect(run.store_url) as conn:
        events = conn.execute(
            "SELECT action, lease_id, detail FROM audit_events WHERE lease_id IS NOT NULL"
        ).fetchall()
    detail = {(a, lid): d if isinstance(d, dict) else json.loads(d) for a, lid, d in events}
    lost_ids = {lid for a, lid in detail if a == "lease.lost"}
    assert lost_ids == {c["lease_id"] for c in forgotten.values()}
    for cred in forgotten.values():
        assert detail[("lease.lost", cred["lease_id"])]["credential_ref"] == leases[
            cred["lease_id"]]["credential_ref"]
    # ... and no leases.revoked event names one of them.
    with psycopg.connect(run.store_url) as conn:
        revoked_events = conn.execute(
            "SELECT detail FROM audit_events WHERE action = 'leases.revoked'").fetchall()
    revoked_ids = {lid for (d,) in revoked_events
                   for lid in (d if isinstance(d, dict) else json.loads(d)).get("lease_ids", [])}
    assert revoked_ids and not revoked_ids & {c["lease_id"] for c in forgotten.values()}
    # ... and which check confirmed the dropped login dead.
    assert detail[("lease.revoked", dropped["lease_id"])]["confirmed_by"] == "database"
    assert CHECKER_PASSWORD not in run.broker.log.read_text(errors="replace")




async def test_a_reconcile_pass_finds_the_leases_vault_forgot_before_anyone_terminates(
        amnesia: Amnesia, pg: PgServer) -> None:
    """No termination at all: Vault's own listing of the broker's paths no longer has the
    forgotten leases, and ``brokerctl reconcile`` says so (exit 7) and records them lost;
    the ones Vault kept stay active, and are revoked as usual afterwards."""
    run = amnesia
    kept = [await run.issue("i-amn-r", "dev-db"), await run.issue("i-amn-r", "dev-cert")]
    await asyncio.to_thread(run.bao.stop)
    copy = await asyncio.to_thread(run.bao.copy_storage, "before-r2")
    await run.vault_restarted()
    forgotten = [await run.issue("i-amn-r", "dev-db"), await run.issue("i-amn-r2", "dev-cert")]
    await run.vault_restarted(restore=copy)

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli.ctl", "reconcile",
        env={**os.environ, "BROKER_URL": run.broker.url, "BROKER_ADMIN_TOKEN": ADMIN_TOKEN},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 7, (proc.returncode, out.decode(), err.decode())
    for cred in forgotten:
        assert cred["lease_id"] in out.decode()
    for cred in kept:
        assert cred["lease_id"] not in out.decode()

    states = {x["lease_id"]: x["state"] for i in ("i-amn-r", "i-amn-r2")
              for x in (await run.instance(i))["leases"]}
    assert [states[c["lease_id"]] for c in forgotten] == ["lost", "lost"]
    assert [states[c["lease_id"]] for c in kept] == ["active", "active"]
    assert can_log_in(pg, forgotten[0])  # lost: it does still work

    assert run.http is not None
    async with run.http.post(f"{run.broker.url}/v1/instances/i-amn-r/terminate",
                             headers=ADMIN) as resp:
        assert resp.status == 202, await resp.text()

    async def kept_revoked() -> bool:
        shown = {x["lease_id"]: x["state"] for x in (await run.instance("i-amn-r"))["leases"]}
        return all(shown[c["lease_id"]] == "revoked" for c in kept)

    await eventually(kept_revoked, "the leases Vault kept revoked", timeout=90)
    assert not can_log_in(pg, kept[0])
    assert parse_serial(kept[1]["data"]["serial_number"]) in crl_serials(run.vault)
    shown = {x["lease_id"]: x["state"] for x in (await run.instance("i-amn-r"))["leases"]}
    assert shown[forgotten[0]["lease_id"]] == "lost"  # still lost: termination changes nothing
