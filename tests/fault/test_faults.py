"""Faults on real components: a broker process killed with SIGKILL mid-revocation, OpenBao
unreachable, the lease store unreachable. Bounded in time."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from datetime import datetime
from pathlib import Path

import aiohttp
import psycopg
import pytest
import yaml

from broker.dev.environment import dev_settings_dict
from broker.leases.migrations import migrate
from broker.secret import Secret
from tests.conftest import ADMIN_SHA, ADMIN_TOKEN
from tests.harness.brokers import TOKEN_REF, serve, serve_on_free_port, wait_ready
from tests.harness.proxy import FaultProxy
from tests.harness.wait import eventually

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
async def vault_proxy(bao):
    proxy = FaultProxy("127.0.0.1", bao.port)
    await proxy.start()
    yield proxy
    await proxy.stop()


async def test_worker_killed_between_vault_revoke_and_store_update_finishes_after_restart(
        workdir, pg, bao, vault_setup, issuer, vault, vault_proxy, http):
    name = await asyncio.to_thread(pg.create_database)
    store_url = pg.url(name)
    procs: list[subprocess.Popen] = []
    try:
        await asyncio.to_thread(migrate, store_url)
        config = workdir / f"crash-{name}.yaml"

        def config_for(port: int) -> Path:
            data = dev_settings_dict(
                vault_addr=vault_proxy.url, broker_token=TOKEN_REF,
                issuer=issuer.issuer, jwks_uri=f"{issuer.issuer}/.well-known/jwks.json",
                store_url=store_url, admin_token_sha256=ADMIN_SHA,
                with_database=True, port=port)
            data["revocation"] = {"tick_s": 0.2, "claim_timeout_s": 5, "backoff_base_s": 0.2}
            config.write_text(yaml.safe_dump(data))
            return config

        log = workdir / f"crash-{name}.log"
        proc, url = await serve_on_free_port(config_for, log, Secret(vault_setup.broker_token))
        procs.append(proc)
        token = issuer.mint(instance="i-crash", workload="payments")
        creds = []
        for role in ("dev-db", "dev-cert", "dev-db"):
            async with http.post(f"{url}/v1/credentials", json={"role": role},
                                 headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 201, await resp.text()
                creds.append(await resp.json())
        users = [c["data"]["username"] for c in creds if c["kind"] == "database_login"]
        assert all(pg.role_exists(u) for u in users)

        vault_proxy.hold_on = b"/v1/auth/token/revoke-accessor"
        async with http.post(f"{url}/v1/instances/i-crash/terminate", headers=ADMIN) as resp:
            assert resp.status == 202
        await asyncio.wait_for(vault_proxy.held.wait(), timeout=60)
        procs[-1].send_signal(signal.SIGKILL)
        procs[-1].wait(timeout=10)

        # Vault has revoked everything; the store has not heard of it yet.
        assert not any(pg.role_exists(u) for u in users)
        with psycopg.connect(store_url) as conn:
            states = sorted(r[0] for r in conn.execute("SELECT state FROM leases"))
            job = conn.execute("SELECT state, attempts FROM revocation_jobs").fetchone()
        assert states == ["active", "active", "active"]
        assert job == ("running", 1)

        vault_proxy.release()
        procs.append(serve(config, log, Secret(vault_setup.broker_token)))
        await wait_ready(url, procs[-1], log=log)

        async def job_done() -> dict | None:
            async with http.get(f"{url}/v1/instances/i-crash", headers=ADMIN) as resp:
                shown = await resp.json()
            return shown if shown["job"]["state"] == "done" else None

        # The dead worker's claim lapses after 5 s.
        shown = await eventually(job_done, "the job finished after the restart", timeout=60)
        assert shown["state"] == "terminated"
        assert shown["job"]["state"] == "done" and shown["job"]["attempts"] == 2
        assert [x["state"] for x in shown["leases"]] == ["revoked"] * 3
        for lease in shown["leases"]:
            assert not vault.lease_exists(lease["vault_lease_id"])
        with psycopg.connect(store_url) as conn:
            revoked_events = conn.execute(
                "SELECT detail FROM audit_events WHERE action = 'leases.revoked'").fetchall()
        assert [e[0]["count"] for e in revoked_events] == [3]  # revoked once, in effect
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        await asyncio.to_thread(pg.drop_database, name)


async def test_vault_unreachable_fails_closed_and_revocation_waits_for_it(
        make_broker, vault_proxy, http, vault):
    b = await make_broker(vault_addr=vault_proxy.url)
    token = {"Authorization": f"Bearer {b.token('i-outage')}"}
    async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-db"},
                         headers=token) as resp:
        assert resp.status == 201
        cred = await resp.json()

    vault_proxy.cut()
    async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-cert"},
                         headers=token) as resp:
        body = await resp.json()
    assert (resp.status, body["error"]["code"]) == (503, "vault_unavailable")
    # The connection was accepted and dropped: Vault may have acted on the request, so the
    # row stays `issuing` (possibly live), never `active`, and nothing was handed out.
    assert sorted(r["state"] for r in b.rows("leases")) == ["active", "issuing"]
    async with http.get(f"{b.url}/readyz") as resp:
        assert resp.status == 503
        assert (await resp.json())["checks"]["vault"] == "unavailable"

    async with http.post(f"{b.url}/v1/instances/i-outage/terminate", headers=b.admin()) as resp:
        assert resp.status == 202

    def retried() -> dict | None:
        job = b.rows("revocation_jobs")[0]
        return job if job["attempts"] >= 2 else None

    job = await eventually(retried, "the job retried while Vault was away")
    assert job["state"] in ("pending", "running") and job["attempts"] >= 2
    assert job["last_error"] == "vault_unavailable"
    [live] = [r for r in b.rows("leases") if r["state"] == "active"]
    assert vault.lease_exists(live["vault_lease_id"])  # not revoked while Vault was away

    vault_proxy.restore()
    await eventually(lambda: b.rows("revocation_jobs")[0]["state"] == "done",
                     "the job done once Vault was back")
    assert b.rows("revocation_jobs")[0]["state"] == "done"
    # The unknown one waited out issuing_timeout_s behind a revoked token, then abandoned.
    assert sorted(r["state"] for r in b.rows("leases")) == ["abandoned", "revoked"]
    active = [r for r in b.rows("leases") if r["vault_lease_id"]]
    assert [r["state"] for r in active] == ["revoked"]
    assert not vault.lease_exists(active[0]["vault_lease_id"])
    assert cred["lease_id"] == active[0]["lease_id"]


async def test_store_unreachable_fails_closed_and_nothing_is_minted(
        make_broker, pg, http, vault):
    proxy = FaultProxy(pg.host, pg.port)
    await proxy.start()
    try:
        name = await asyncio.to_thread(pg.create_database)
        store_url = f"postgresql://postgres@127.0.0.1:{proxy.port}/{name}"
        b = await make_broker(store_url=store_url)
        token = {"Authorization": f"Bearer {b.token('i-nostore')}"}
        before = vault.snapshot()
        proxy.cut()
        async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-db"},
                             headers=token) as resp:
            body = await resp.json()
        assert (resp.status, body["error"]["code"]) == (503, "store_unavailable")
        assert vault.snapshot() == before
        async with http.get(f"{b.url}/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["checks"]["store"] == "unavailable"
        proxy.restore()
        async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-db"},
                             headers=token) as resp:
            assert resp.status == 201
    finally:
        await proxy.stop()
        await asyncio.to_thread(pg.drop_database, name)


def _pg_logins(pg) -> set[str]:
    with psycopg.connect(pg.admin_url) as conn:
        return {r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'v-%'")}


def _logins_of(pg, vault, lease: str, candidates: set[str]) -> set[str]:
    """Those of ``candidates`` that ``lease`` created, as far as PostgreSQL shows it: the
    name ends with the creation's unix time (the plugin's username template), and VALID
    UNTIL is the lease's expiry plus the few seconds OpenBao adds (5 s, seen), in whole
    seconds."""
    status, body = vault.call("PUT", "sys/leases/lookup", {"lease_id": lease})
    assert status == 200, body
    issued = datetime.fromisoformat(body["data"]["issue_time"]).timestamp()
    expires = datetime.fromisoformat(body["data"]["expire_time"])
    with psycopg.connect(pg.admin_url) as conn:
        rows = conn.execute("SELECT rolname, rolvaliduntil FROM pg_roles WHERE rolname = ANY(%s)",
                            (sorted(candidates),)).fetchall()
    return {name for name, until in rows
            if until is not None and abs(int(name.rsplit("-", 1)[1]) - issued) <= 2
            and -1 <= (until - expires).total_seconds() <= 10}


@pytest.mark.parametrize(("one_round_trip", "completion"), [
    # The completion's one round trip (its statement text goes out when first prepared, as
    # on this broker's first exchange), and the general path's UPDATE.
    (True, b"broker_complete_issue("),
    (False, b"UPDATE leases SET state="),
], ids=["one-round-trip", "general-path"])
async def test_crash_between_vault_issuing_and_the_store_recording_is_reconciled(
        workdir, pg, bao, vault_setup, issuer, vault, http, one_round_trip, completion):
    """kill -9 while the store write that records Vault's answer is in flight: Vault issued
    a PostgreSQL login nobody recorded. After a restart the reconciler finds the row stuck
    in ``issuing``, matches it to the unrecorded lease under its path and revokes it."""
    name = await asyncio.to_thread(pg.create_database)
    store_url = pg.url(name)
    store_proxy = FaultProxy(pg.host, pg.port)
    await store_proxy.start()
    procs: list[subprocess.Popen] = []
    try:
        await asyncio.to_thread(migrate, store_url)
        port = 0  # the one the first broker served on, for the second

        def config(url: str, tag: str) -> Path:
            data = dev_settings_dict(
                vault_addr=bao.addr, broker_token=TOKEN_REF,
                issuer=issuer.issuer, jwks_uri=f"{issuer.issuer}/.well-known/jwks.json",
                store_url=url, admin_token_sha256=ADMIN_SHA, with_database=True, port=port)
            data["revocation"] = {"tick_s": 0.2, "claim_timeout_s": 5, "issuing_timeout_s": 5}
            data["reconcile"] = {"tick_s": 3600, "clock_skew_s": 0}
            data["store"]["one_round_trip"] = one_round_trip
            path = workdir / f"stuck-{tag}-{name}.yaml"
            path.write_text(yaml.safe_dump(data))
            return path

        def proxied(chosen: int) -> Path:
            nonlocal port
            port = chosen
            return config(f"postgresql://postgres@127.0.0.1:{store_proxy.port}/{name}",
                          "proxied")

        log = workdir / f"stuck-{name}.log"
        proc, url = await serve_on_free_port(proxied, log, Secret(vault_setup.broker_token))
        procs.append(proc)
        leases_before = set(vault.leases_under("database/creds/dev-db/"))
        logins_before = _pg_logins(pg)

        store_proxy.hold_on = completion
        token = issuer.mint(instance="i-stuck-crash", workload="payments")
        request = asyncio.create_task(http.post(
            f"{url}/v1/credentials", json={"role": "dev-db"},
            headers={"Authorization": f"Bearer {token}"}))
        await asyncio.wait_for(store_proxy.held.wait(), timeout=60)
        procs[-1].send_signal(signal.SIGKILL)
        procs[-1].wait(timeout=10)
        with contextlib.suppress(aiohttp.ClientError):
            (await request).release()

        lost = set(vault.leases_under("database/creds/dev-db/")) - leases_before
        assert len(lost) == 1  # issued by Vault, unknown to the store
        # The PostgreSQL server is shared with other test runs, whose logins come and go
        # meanwhile: the lost lease's login is the new one that expires when it does.
        logins = _logins_of(pg, vault, f"database/creds/dev-db/{next(iter(lost))}",
                            _pg_logins(pg) - logins_before)
        assert len(logins) == 1
        store_proxy.release()
        with psycopg.connect(store_url) as conn:
            [(lease_id, state)] = conn.execute("SELECT lease_id, state FROM leases").fetchall()
        assert state == "issuing"

        procs.append(serve(config(store_url, "direct"), log, Secret(vault_setup.broker_token)))
        await wait_ready(url, procs[-1], log=log)
        # Past twice the issuing bound from the row: the request is dead, and no request
        # could record a lease issued in its window any more.
        await asyncio.sleep(10.5)
        async with http.post(f"{url}/v1/admin/reconcile", headers=ADMIN) as resp:
            report = await resp.json()
        assert resp.status == 200, report
        assert report["stuck_settled"] == 1 and report["stuck_revoked_in_vault"] >= 1
        [lost_id] = lost
        assert not vault.lease_exists(f"database/creds/dev-db/{lost_id}")
        assert not any(pg.role_exists(login) for login in logins)
        with psycopg.connect(store_url) as conn:
            row = conn.execute("SELECT state, error_code FROM leases WHERE lease_id = %s",
                               (lease_id,)).fetchone()
            settled = conn.execute("SELECT detail FROM audit_events "
                                   "WHERE action = 'lease.stuck_settled'").fetchall()
        assert row == ("abandoned", "stuck_issuing")
        assert f"database/creds/dev-db/{lost_id}" in settled[0][0]["vault_lease_ids"]
        # The instance itself is untouched: it may ask again.
        again = issuer.mint(instance="i-stuck-crash", workload="payments")
        async with http.post(f"{url}/v1/credentials", json={"role": "dev-db"},
                             headers={"Authorization": f"Bearer {again}"}) as resp:
            assert resp.status == 201
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        await store_proxy.stop()
        await asyncio.to_thread(pg.drop_database, name)
