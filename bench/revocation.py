"""Revocation through the broker vs OpenBao revoking an instance token itself, in the same run.

1. One instance holding N leases (default 1,000), for dev-cert (PKI) and dev-db (PostgreSQL
   dynamic roles):
   - direct: an instance token from the same token role, with the same request body the
     broker sends (``VaultClient.create_instance_token``), reads N credentials; then the
     clock runs from ``auth/token/revoke-accessor`` (a) until it returns and (b) until
     ``LIST sys/leases/lookup/<prefix>`` shows none of the N leases any more: OpenBao's own
     time to revoke what the token held (it only *queues* them when the revoke returns);
   - broker: a dev-issuer JWT for one instance gets N credentials from ``POST
     /v1/credentials``; then the clock runs from ``POST /v1/instances/{id}/terminate``
     (admin token) until the instance's job is ``done``: every lease revoked, the token
     revoked, every lease confirmed gone. The job is polled in the store (see StoreProbe
     for why not through the API); ``GET /v1/instances/{id}`` then must show the instance
     ``terminated``, its job ``done`` and every lease ``revoked``, and OpenBao must list
     none of them.
   The ratio is broker ÷ direct (b). The job's phases come from the store's timestamps
   (job created → first revocation stamped → leases marked revoked → job done), and the CPU seconds
   OpenBao and the broker spent from /proc: on a 2-core machine shared by the bench, the
   broker, OpenBao and PostgreSQL, CPU is what the two paths compete for.
2. A fleet: I instances × L leases of dev-cert (PKI, EC P-256: the fastest engine to issue
   here) through two ``broker serve`` replicas on one PostgreSQL store. Each instance gets
   its leases from one replica (instance k from replica k mod 2) and is terminated through
   the other; the clock runs from the first terminate request until the last job's
   ``completed_at``. Prints the issue time, instances/s and leases/s, jobs done per
   replica and CPU seconds. Before it, the same fleet straight against OpenBao (a token
   per instance, every token revoked by accessor at the same concurrency, until OpenBao
   lists none of the leases) gives the ratio broker ÷ direct.

3. Terminate → credential dead, for dev-db (PostgreSQL dynamic credentials): an instance
   gets K credentials (1, 10, 100) through the broker, each is shown to log in to the
   PostgreSQL database the role creates its users in, then the clock runs from ``POST
   /v1/instances/{id}/terminate`` until a login with each credential has failed (logins
   are attempted over and over, 4 at a time, every few ms: the figure is the end of the
   first failed attempt of the last credential). 20 runs per K, p50 and p99 (with 20 runs
   the p99 is the slowest run). The same straight against OpenBao (``revoke-accessor`` on
   the instance token) as the reference.

The PKI mount rebuilds its CRL periodically (``auto_rebuild``) unless ``--crl-on-revoke``:
with OpenBao's default every revocation rebuilds the whole CRL, so a thousand cost O(n²)
and whichever path runs second pays for the first's revoked certificates.

Everything is on loopback; every phase is bounded in count and time; the store databases
are dropped, the processes stopped and the dev-db leases revoked at the end, on failure too.

    python bench/revocation.py [--n 1000] [--instances 2000] [--leases-per-instance 3]
                               [--roles dev-cert,dev-db] [--skip-single] [--skip-fleet]
                               [--crl-on-revoke] [--skip-dead] [--dead-runs 20] [--pin]

``--pin`` puts the brokers on CPU 0 and OpenBao and this client on CPU 1 (PostgreSQL, the
machine's shared server, is not pinned), so the broker's CPU no longer comes out of
OpenBao's share; both paths then have one core for OpenBao.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psycopg
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import procstat  # noqa: E402
from bench.exchange import bench_config, pct, run_phase, start_broker, wait_ready  # noqa: E402
from broker.dev.issuer import DevIssuer  # noqa: E402
from broker.dev.openbao import OpenBaoDevServer, free_port  # noqa: E402
from broker.leases.migrations import migrate  # noqa: E402
from broker.vault.bootstrap import TOKEN_ROLE, bootstrap_dev  # noqa: E402
from tests.harness.postgres import find_or_start_postgres  # noqa: E402

WORKLOAD = "payments"
ISSUE_CONCURRENCY = 16  # as bench/exchange.py; the broker's own revocation fan-out is 16 too
FLEET_CONCURRENCY = 32  # requests in flight over both replicas
WAIT_TIMEOUT_S = 300  # any one wait for revocation to finish
JOB_POLL_S = 0.02  # one indexed row read in the store per poll
LIST_POLL_S = 0.025  # LIST sys/leases/lookup/<prefix> is cheap
STORE_POLL_S = 0.2
POOL_SIZE = 10  # per replica, up to twice that with overflow
PREFIX = {"dev-cert": "pki/issue/dev-cert", "dev-db": "database/creds/dev-db"}
DEAD_COUNTS = (1, 10, 100)  # credentials per instance, terminate → credential dead
DEAD_RUNS = 20
LOGIN_CONCURRENCY = 4  # login attempts in flight: each forks a backend that competes with Vault
LOGIN_POLL_S = 0.005  # between two sweeps over the credentials still alive
LOGIN_TIMEOUT_S = 5.0  # one connection attempt
DEAD_TIMEOUT_S = 60.0  # one run, from the terminate request until every login fails


def now_wall() -> float:
    return time.time()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux): on a small shared machine the
    CPU each process spends says more than wall time alone."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_ts(value: str | None) -> float | None:
    if value is None:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class VaultDirect:
    """What the broker does against OpenBao, done by hand with the broker's own token."""

    def __init__(self, http: aiohttp.ClientSession, addr: str, token: str) -> None:
        self.http, self.addr, self.token = http, addr, token

    async def _call(
        self, method: str, path: str, *, token: str | None = None, body: Any = None
    ) -> tuple[int, dict[str, Any]]:
        async with self.http.request(
            method,
            f"{self.addr}/v1/{path}",
            headers={"X-Vault-Token": token or self.token},
            json=body,
        ) as resp:
            payload = await resp.json(content_type=None) if resp.status != 204 else {}
            return resp.status, payload or {}

    async def instance_token(self, instance: str) -> tuple[str, str]:
        """The request ``VaultClient.create_instance_token`` sends. Returns (token, accessor)."""
        status, body = await self._call(
            "POST",
            f"auth/token/create/{TOKEN_ROLE}",
            body={
                "policies": ["broker-instance"],
                "no_default_policy": True,
                "ttl": "86400s",
                "renewable": False,
                "display_name": "broker-instance",
                "meta": {"instance_id": instance, "workload": WORKLOAD, "issuer": "dev"},
            },
        )
        assert status == 200, body
        return body["auth"]["client_token"], body["auth"]["accessor"]

    async def issue(self, token: str, role: str) -> str:
        if role == "dev-cert":
            status, body = await self._call(
                "POST",
                "pki/issue/dev-cert",
                token=token,
                body={"common_name": f"{WORKLOAD}.workload.internal", "ttl": "600s"},
            )
        else:
            status, body = await self._call("GET", "database/creds/dev-db", token=token)
        assert status == 200 and body.get("lease_id"), body
        return str(body["lease_id"])

    async def revoke_accessor(self, accessor: str) -> None:
        status, body = await self._call(
            "POST", "auth/token/revoke-accessor", body={"accessor": accessor}
        )
        assert status in (200, 204), body

    async def listed(self, prefix: str) -> set[str]:
        """Lease ids OpenBao still holds under ``prefix`` (full ids)."""
        status, body = await self._call("GET", f"sys/leases/lookup/{prefix}/?list=true")
        if status == 404:
            return set()
        assert status == 200, body
        return {f"{prefix}/{k}" for k in body.get("data", {}).get("keys", [])}

    async def wait_gone(self, prefix: str, lease_ids: set[str], timeout: float) -> int:
        """Poll until none of ``lease_ids`` is listed; returns how many polls it took."""
        deadline = time.monotonic() + timeout
        polls = 0
        while True:
            polls += 1
            if not (await self.listed(prefix)) & lease_ids:
                return polls
            if time.monotonic() > deadline:
                raise TimeoutError(f"OpenBao still holds leases under {prefix} after {timeout}s")
            await asyncio.sleep(LIST_POLL_S)


class BrokerClient:
    def __init__(self, http: aiohttp.ClientSession, url: str, admin_token: str) -> None:
        self.http, self.url = http, url
        self.admin = {"Authorization": f"Bearer {admin_token}"}

    async def issue(self, jwt: str, role: str) -> None:
        async with self.http.post(
            f"{self.url}/v1/credentials",
            json={"role": role, "ttl": "10m"},
            headers={"Authorization": f"Bearer {jwt}"},
        ) as resp:
            assert resp.status == 201, await resp.text()
            await resp.read()

    async def terminate(self, instance: str) -> dict[str, Any]:
        async with self.http.post(
            f"{self.url}/v1/instances/{instance}/terminate", headers=self.admin
        ) as resp:
            assert resp.status == 202, await resp.text()
            return await resp.json()

    async def instance(self, instance: str) -> dict[str, Any]:
        async with self.http.get(f"{self.url}/v1/instances/{instance}", headers=self.admin) as r:
            assert r.status == 200, await r.text()
            return await r.json()


@dataclass
class Env:
    """Everything a run starts; ``close`` undoes it, each step on its own."""

    work: Path
    pg: Any = None
    bao: OpenBaoDevServer | None = None
    setup: Any = None
    issuer: DevIssuer | None = None
    issuer_runner: web.AppRunner | None = None
    admin_token: str = ""
    crl_auto_rebuild: bool = True
    pin: bool = False  # brokers on CPU 0, OpenBao and this client on CPU 1

    def __post_init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.databases: list[str] = []
        self.probes: list[StoreProbe] = []

    async def start(self) -> None:
        self.pg = find_or_start_postgres(self.work)
        self.bao = OpenBaoDevServer(self.work / "openbao")
        self.bao.start()
        if self.pin and self.bao.proc is not None:
            # PostgreSQL is the machine's shared server: not pinned.
            procstat.pin(self.bao.proc.pid, {1})
            procstat.pin(os.getpid(), {1})
        self.setup = bootstrap_dev(
            self.bao.addr, self.bao.root_token, postgres_url=self.pg.admin_url
        )
        if self.crl_auto_rebuild:
            # With OpenBao's default, every certificate revocation rebuilds the whole CRL
            # under the PKI mount's revocation lock: the n-th revocation costs O(n), a
            # thousand cost O(n²), and whichever path runs second pays for the first's
            # revoked certificates. Large PKI deployments rebuild periodically instead.
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    f"{self.bao.addr}/v1/pki/config/crl",
                    headers={"X-Vault-Token": self.bao.root_token},
                    json={"auto_rebuild": True},
                ) as resp:
                    assert resp.status in (200, 204), await resp.text()
        iport = free_port()
        self.issuer = DevIssuer.generate(f"http://127.0.0.1:{iport}")
        self.issuer_runner = web.AppRunner(self.issuer.app(), access_log=None)
        await self.issuer_runner.setup()
        await web.TCPSite(self.issuer_runner, "127.0.0.1", iport).start()
        self.admin_token = "adm-" + secrets.token_urlsafe(24)

    def store(self, prefix: str) -> str:
        name = self.pg.create_database(prefix)
        self.databases.append(name)
        url = self.pg.url(name)
        migrate(url)
        return url

    def probe(self, url: str) -> StoreProbe:
        self.probes.append(StoreProbe(url))
        return self.probes[-1]

    async def brokers(
        self, http: aiohttp.ClientSession, store_url: str, count: int, max_leases: int
    ) -> list[BrokerClient]:
        """``count`` replicas of ``broker serve`` on one store, each in its own directory."""
        assert self.bao is not None and self.issuer is not None
        clients = []
        for _ in range(count):
            port = free_port()
            d = Path(tempfile.mkdtemp(prefix="broker-", dir=self.work))
            cfg = bench_config(self.bao, self.setup, self.issuer, store_url, port)
            cfg["admin"]["token_sha256"] = hashlib.sha256(self.admin_token.encode()).hexdigest()
            for role in cfg["roles"].values():
                role["max_leases_per_instance"] = max_leases
            # Each replica's pool may double (overflow); keep every replica's share of the
            # shared server's 100 connections bounded.
            cfg["store"]["pool_size"] = POOL_SIZE
            self.procs.append(start_broker(cfg, d))
            url = f"http://127.0.0.1:{port}"
            await wait_ready(http, url, d)
            if self.pin:  # after start-up: threads started meanwhile are pinned too
                procstat.pin(self.procs[-1].pid, {0})
            clients.append(BrokerClient(http, url, self.admin_token))
        return clients

    def stop_brokers(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.terminate()
        for proc in self.procs:
            with contextlib.suppress(Exception):
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self.procs.clear()

    async def close(self) -> None:
        self.stop_brokers()
        for probe in self.probes:
            with contextlib.suppress(Exception):
                probe.close()
        if self.bao is not None and self.bao.proc is not None and self.setup is not None:
            # PostgreSQL roles outlive OpenBao: revoke every dev-db lease still there.
            # (PKI leases and tokens live in the dev server's memory and go with it.)
            with contextlib.suppress(Exception):
                timeout = aiohttp.ClientTimeout(total=WAIT_TIMEOUT_S)
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    async with http.put(
                        f"{self.bao.addr}/v1/sys/leases/revoke-prefix/{PREFIX['dev-db']}",
                        headers={"X-Vault-Token": self.bao.root_token},
                        json={"sync": True},
                    ) as resp:
                        await resp.read()
        if self.issuer_runner is not None:
            with contextlib.suppress(Exception):
                await self.issuer_runner.cleanup()
        if self.bao is not None:
            with contextlib.suppress(Exception):
                self.bao.stop()
        for name in self.databases:
            with contextlib.suppress(Exception):
                self.pg.drop_database(name)
        if self.pg is not None:
            with contextlib.suppress(Exception):
                self.pg.stop()


class StoreProbe:
    """Reads the brokers' store directly. Waiting for a job is polled here, not through
    ``GET /v1/instances/{id}``: that answer carries every lease of the instance, and with
    1,000 leases it costs the broker ~0.2 s of CPU on the event loop its revocation worker
    runs on; polled every 0.1 s, it would slow the job it measures (the bench prints the
    cost of one call)."""

    def __init__(self, url: str) -> None:
        self._conn = psycopg.connect(url, autocommit=True, connect_timeout=5)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()

    async def aquery(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return await asyncio.to_thread(self.query, sql, params)

    async def wait_job_done(self, instance: str, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        polls = 0
        while True:
            polls += 1
            rows = await self.aquery(
                "SELECT state, last_error FROM revocation_jobs WHERE instance_id = %s",
                (instance,),
            )
            if rows and rows[0][0] == "done":
                return polls
            if rows and rows[0][0] == "failed":
                raise RuntimeError(f"revocation job failed: {rows[0][1]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"instance {instance} not terminated after {timeout}s: {rows}")
            await asyncio.sleep(JOB_POLL_S)

    def close(self) -> None:
        self._conn.close()


async def one_instance(
    env: Env,
    http: aiohttp.ClientSession,
    broker: BrokerClient,
    store: StoreProbe,
    role: str,
    n: int,
) -> dict[str, Any]:
    assert env.bao is not None and env.issuer is not None
    vault = VaultDirect(http, env.bao.addr, env.setup.broker_token)
    prefix = PREFIX[role]
    tag = secrets.token_hex(3)

    assert env.bao.proc is not None
    bao_pid, broker_pid = env.bao.proc.pid, env.procs[-1].pid

    async def direct_round(count: int, name: str) -> dict[str, Any]:
        token, accessor = await vault.instance_token(name)
        leases: set[str] = set()

        async def one(_: int) -> None:
            leases.add(await vault.issue(token, role))

        issued = await run_phase(count, ISSUE_CONCURRENCY, one)
        cpu0 = cpu_seconds(bao_pid)
        t0 = time.perf_counter()
        await vault.revoke_accessor(accessor)
        returned = time.perf_counter() - t0
        polls = await vault.wait_gone(prefix, leases, WAIT_TIMEOUT_S)
        gone = time.perf_counter() - t0
        return {
            "issue_per_s": issued["throughput"],
            "revoke_call_s": returned,
            "all_gone_s": gone,
            "polls": polls,
            "bao_cpu_s": cpu_seconds(bao_pid) - cpu0,
        }

    async def broker_round(count: int, name: str) -> dict[str, Any]:
        jwt = env.issuer.mint(instance=name, workload=WORKLOAD, ttl=1800)  # type: ignore[union-attr]
        issued = await run_phase(count, ISSUE_CONCURRENCY, lambda _: broker.issue(jwt, role))
        cpu0 = cpu_seconds(bao_pid), cpu_seconds(broker_pid)
        sent = now_wall()
        t0 = time.perf_counter()
        await broker.terminate(name)
        polls = await store.wait_job_done(name, WAIT_TIMEOUT_S)
        done = time.perf_counter() - t0
        cpu1 = cpu_seconds(bao_pid), cpu_seconds(broker_pid)
        # The API's view once done; its cost to the broker per call (every lease in it).
        t1 = time.perf_counter()
        for _ in range(3):
            body = await broker.instance(name)
        get_s = (time.perf_counter() - t1) / 3
        get_cpu = (cpu_seconds(broker_pid) - cpu1[1]) / 3
        assert body["state"] == "terminated" and body["job"]["state"] == "done", body["job"]
        job = body["job"]
        revoked = sum(1 for lease in body["leases"] if lease["state"] == "revoked")
        assert revoked == count, f"{revoked} of {count} leases revoked"
        # The job confirmed each lease gone; OpenBao agrees.
        left = await vault.listed(prefix) & {lease["vault_lease_id"] for lease in body["leases"]}
        assert not left, f"{len(left)} leases still in OpenBao"
        return {
            "issue_per_s": issued["throughput"],
            "done_polled_s": done,
            "done_server_s": parse_ts(job["completed_at"]) - sent,  # type: ignore[operator]
            "attempts": job["attempts"],
            "polls": polls,
            "phases": phases(store, name),
            "bao_cpu_s": cpu1[0] - cpu0[0],
            "broker_cpu_s": cpu1[1] - cpu0[1],
            "get_instance_s": get_s,
            "get_instance_cpu_s": get_cpu,
        }

    # Warm-up on other instances: connections, code paths, a first revocation job.
    await direct_round(20, f"rev-warm-d-{tag}")
    await broker_round(20, f"rev-warm-b-{tag}")
    direct = await direct_round(n, f"rev-d-{tag}")
    via = await broker_round(n, f"rev-b-{tag}")
    return {
        "role": role,
        "n": n,
        "direct": direct,
        "broker": via,
        "ratio": via["done_polled_s"] / direct["all_gone_s"],
    }


class Logins:
    """Logs in to the PostgreSQL database the dev-db role creates its users in, as a
    workload would with its credential."""

    def __init__(self, admin_url: str) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(admin_url.replace("postgresql+psycopg://", "postgresql://"))
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 5432
        self.database = (parts.path or "/postgres").lstrip("/") or "postgres"
        self._sem = asyncio.Semaphore(LOGIN_CONCURRENCY)

    async def works(self, user: str, password: str) -> bool:
        """True: logged in (and out again); False: PostgreSQL refused the credential (its
        role is gone, or its password no longer holds). Anything else raises."""
        async with self._sem:
            try:
                conn = await asyncpg.connect(
                    host=self.host,
                    port=self.port,
                    user=user,
                    password=password,
                    database=self.database,
                    timeout=LOGIN_TIMEOUT_S,
                )
            except asyncpg.InvalidAuthorizationSpecificationError:
                return False  # 28000 role does not exist / 28P01 password refused
            await conn.close(timeout=LOGIN_TIMEOUT_S)
            return True

    async def until_all_fail(self, creds: list[tuple[str, str]], t0: float) -> float:
        """Attempt every credential still working, sweep after sweep, until each has
        failed once; seconds from ``t0`` (``perf_counter``) to the last first failure."""
        alive = list(creds)
        last = 0.0
        deadline = t0 + DEAD_TIMEOUT_S
        while alive:
            answers = await asyncio.gather(*(self.works(u, p) for u, p in alive))
            now = time.perf_counter()
            if not all(answers):
                last = now - t0
            alive = [c for c, ok in zip(alive, answers, strict=True) if ok]
            if alive and now > deadline:
                raise TimeoutError(f"{len(alive)} credential(s) still log in: {DEAD_TIMEOUT_S}s")
            if alive:
                await asyncio.sleep(LOGIN_POLL_S)
        return last


async def terminate_to_dead(
    env: Env, http: aiohttp.ClientSession, broker: BrokerClient, runs: int
) -> dict[str, Any]:
    """Terminate → every credential's PostgreSQL login fails, through the broker and
    straight against OpenBao, ``runs`` times for each count in ``DEAD_COUNTS``."""
    assert env.bao is not None and env.issuer is not None
    vault = VaultDirect(http, env.bao.addr, env.setup.broker_token)
    logins = Logins(env.pg.admin_url)
    tag = secrets.token_hex(3)

    async def via_broker(k: int, run: int) -> float:
        name = f"dead-b-{tag}-{k}-{run}"
        jwt = env.issuer.mint(instance=name, workload=WORKLOAD, ttl=1800)  # type: ignore[union-attr]
        creds: list[tuple[str, str]] = []

        async def one(_: int) -> None:
            async with http.post(
                f"{broker.url}/v1/credentials",
                json={"role": "dev-db", "ttl": "10m"},
                headers={"Authorization": f"Bearer {jwt}"},
            ) as resp:
                assert resp.status == 201, await resp.text()
                data = (await resp.json())["data"]
                creds.append((data["username"], data["password"]))

        await run_phase(k, ISSUE_CONCURRENCY, one)
        assert all(await asyncio.gather(*(logins.works(u, p) for u, p in creds)))
        t0 = time.perf_counter()
        await broker.terminate(name)
        return await logins.until_all_fail(creds, t0)

    async def direct(k: int, run: int) -> float:
        token, accessor = await vault.instance_token(f"dead-d-{tag}-{k}-{run}")
        creds: list[tuple[str, str]] = []

        async def one(_: int) -> None:
            status, body = await vault._call("GET", "database/creds/dev-db", token=token)
            assert status == 200, body
            creds.append((body["data"]["username"], body["data"]["password"]))

        await run_phase(k, ISSUE_CONCURRENCY, one)
        assert all(await asyncio.gather(*(logins.works(u, p) for u, p in creds)))
        t0 = time.perf_counter()
        await vault.revoke_accessor(accessor)
        return await logins.until_all_fail(creds, t0)

    out: dict[str, Any] = {"runs": runs, "counts": {}}
    for k in DEAD_COUNTS:
        row: dict[str, Any] = {}
        for name, measure in (("broker", via_broker), ("direct", direct)):
            await measure(k, -1)  # warm-up
            times = [await measure(k, run) for run in range(runs)]
            row[name] = {
                "p50_ms": pct(times, 50) * 1000,
                "p99_ms": pct(times, 99) * 1000,
                "max_ms": max(times) * 1000,
            }
        out["counts"][k] = row
        print(
            f"  terminate → dead, {k} credential(s): broker p50 {row['broker']['p50_ms']:.0f} ms "
            f"p99 {row['broker']['p99_ms']:.0f} ms; direct p50 {row['direct']['p50_ms']:.0f} ms "
            f"p99 {row['direct']['p99_ms']:.0f} ms",
            flush=True,
        )
    return out


def phases(store: StoreProbe, instance: str) -> dict[str, float]:
    """Where the job's time went, from the store's own timestamps: job created → the first
    revocation stamped (``revoke_sent_at``: the job claimed, its work read, the leases
    looked up) → leases marked revoked (revocations, the token, Vault's confirmation; the
    job's last transaction records them) → job done."""
    created, completed = store.query(
        "SELECT created_at, completed_at FROM revocation_jobs WHERE instance_id = %s",
        (instance,),
    )[0]
    stamped, ended = store.query(
        "SELECT min(revoke_sent_at), max(ended_at) FROM leases WHERE instance_id = %s",
        (instance,),
    )[0]
    return {
        "start_s": (stamped - created).total_seconds(),
        "revoke_s": (ended - stamped).total_seconds(),
        "finish_s": (completed - ended).total_seconds(),
    }


async def fleet_direct(
    env: Env, http: aiohttp.ClientSession, instances: int, per: int
) -> dict[str, Any]:
    """The same fleet straight against OpenBao: a token per instance, ``per`` leases each,
    then every token revoked by accessor (same concurrency as the broker's terminate
    requests) until OpenBao lists none of the leases."""
    assert env.bao is not None and env.bao.proc is not None
    vault = VaultDirect(http, env.bao.addr, env.setup.broker_token)
    tag = secrets.token_hex(3)
    tokens: list[tuple[str, str]] = [("", "")] * instances
    leases: set[str] = set()

    async def token(k: int) -> None:
        tokens[k] = await vault.instance_token(f"fleet-d-{tag}-{k}")

    async def issue(i: int) -> None:
        leases.add(await vault.issue(tokens[i // per][0], "dev-cert"))

    await run_phase(instances, FLEET_CONCURRENCY, token)
    issued = await run_phase(instances * per, FLEET_CONCURRENCY, issue)
    cpu0 = cpu_seconds(env.bao.proc.pid)
    t0 = time.perf_counter()
    await run_phase(instances, FLEET_CONCURRENCY, lambda k: vault.revoke_accessor(tokens[k][1]))
    accepted = time.perf_counter() - t0
    await vault.wait_gone(PREFIX["dev-cert"], leases, WAIT_TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    return {
        "issue_per_s": issued["throughput"],
        "revoke_calls_s": accepted,
        "revoke_s": elapsed,
        "instances_per_s": instances / elapsed,
        "leases_per_s": instances * per / elapsed,
        "bao_cpu_s": cpu_seconds(env.bao.proc.pid) - cpu0,
    }


async def fleet(
    env: Env,
    http: aiohttp.ClientSession,
    replicas: list[BrokerClient],
    store: StoreProbe,
    instances: int,
    per: int,
) -> dict[str, Any]:
    assert env.issuer is not None
    tag = secrets.token_hex(3)
    names = [f"fleet-{tag}-{k}" for k in range(instances)]
    # Identity tokens are minted before timing starts: the workload brings its own.
    jwts = [env.issuer.mint(instance=name, workload=WORKLOAD, ttl=3600) for name in names]
    total = instances * per
    # Lease j of instance k: request k*per + j, so an instance's requests run close together.
    issued = await run_phase(
        total,
        FLEET_CONCURRENCY,
        lambda i: replicas[(i // per) % 2].issue(jwts[i // per], "dev-cert"),
    )
    live = store.query("SELECT count(*) FROM leases WHERE state = 'active'")[0][0]
    assert live == total, f"{live} active leases, expected {total}"

    sem = asyncio.Semaphore(FLEET_CONCURRENCY)

    async def terminate(k: int) -> None:
        async with sem:
            await replicas[(k + 1) % 2].terminate(names[k])

    assert env.bao is not None and env.bao.proc is not None
    pids = [env.bao.proc.pid, *(proc.pid for proc in env.procs[-len(replicas) :])]
    cpu0 = [cpu_seconds(pid) for pid in pids]
    sent = now_wall()
    t0 = time.perf_counter()
    accepted: list[float] = []

    async def send_all() -> None:
        await asyncio.gather(*(terminate(k) for k in range(instances)))
        accepted.append(time.perf_counter() - t0)

    sender = asyncio.create_task(asyncio.wait_for(send_all(), WAIT_TIMEOUT_S))
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    try:
        while True:
            counts = dict(
                await store.aquery("SELECT state, count(*) FROM revocation_jobs GROUP BY state")
            )
            if counts.get("done", 0) >= instances:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"fleet not revoked after {WAIT_TIMEOUT_S}s: jobs {counts}")
            await asyncio.sleep(STORE_POLL_S)
        polled = time.perf_counter() - t0
        cpu = [cpu_seconds(pid) - c for pid, c in zip(pids, cpu0, strict=True)]
        await sender
    finally:
        if not sender.done():
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
    last_done = store.query("SELECT max(completed_at) FROM revocation_jobs")[0][0]
    by_worker = store.query("SELECT claimed_by, count(*) FROM revocation_jobs GROUP BY claimed_by")
    retried = store.query("SELECT count(*) FROM revocation_jobs WHERE attempts > 1")
    retried = retried[0][0]
    revoked = store.query("SELECT count(*) FROM leases WHERE state = 'revoked'")[0][0]
    assert revoked == total, f"{revoked} of {total} leases revoked"
    elapsed = last_done.replace(tzinfo=last_done.tzinfo or UTC).timestamp() - sent
    return {
        "instances": instances,
        "leases_per_instance": per,
        "role": "dev-cert",
        "issue_s": total / issued["throughput"],
        "issue_per_s": issued["throughput"],
        "terminate_accepted_s": accepted[0],
        "revoke_s": elapsed,
        "revoke_polled_s": polled,
        "instances_per_s": instances / elapsed,
        "leases_per_s": total / elapsed,
        "jobs_by_replica": sorted(int(c) for _, c in by_worker),
        "jobs_retried": int(retried),
        "bao_cpu_s": cpu[0],
        "replicas_cpu_s": cpu[1:],
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="leases of the one instance (≤1000)")
    ap.add_argument("--roles", default="dev-cert,dev-db")
    ap.add_argument("--instances", type=int, default=2000)
    ap.add_argument("--leases-per-instance", type=int, default=3)
    ap.add_argument("--skip-single", action="store_true")
    ap.add_argument("--skip-fleet", action="store_true")
    ap.add_argument(
        "--crl-on-revoke",
        action="store_true",
        help="keep OpenBao's default: rebuild the PKI CRL on every revocation (O(n²))",
    )
    ap.add_argument("--skip-dead", action="store_true", help="skip terminate → credential dead")
    ap.add_argument("--dead-runs", type=int, default=DEAD_RUNS)
    ap.add_argument(
        "--pin",
        action="store_true",
        help="pin the brokers to CPU 0, OpenBao and this client to CPU 1",
    )
    ap.add_argument(
        "--time-limit",
        type=float,
        default=480,
        help="seconds for every measurement together; past it the rest is skipped (exit 2)",
    )
    args = ap.parse_args()
    if not 1 <= args.n <= 1000:
        ap.error("--n: 1..1000 (a role allows at most 1000 live leases per instance)")
    if not 1 <= args.leases_per_instance <= 1000 or not 1 <= args.instances <= 100_000:
        ap.error("--instances 1..100000, --leases-per-instance 1..1000")

    work = Path(tempfile.mkdtemp(prefix="broker-bench-revocation-"))
    os.chmod(work, 0o755)
    if args.pin and (os.cpu_count() or 1) < 2:
        ap.error("--pin: needs two CPUs")
    env = Env(work, crl_auto_rebuild=not args.crl_on_revoke, pin=args.pin)
    singles: list[dict[str, Any]] = []
    swarm: dict[str, Any] | None = None
    dead: dict[str, Any] | None = None
    ok = False
    limit = asyncio.timeout(args.time_limit)
    try:
        await env.start()
        print(
            "pinned: brokers on CPU 0, OpenBao and this client on CPU 1, PostgreSQL unpinned "
            "(the machine's shared server)"
            if args.pin
            else "unpinned: brokers, OpenBao, PostgreSQL and this client share every CPU",
            flush=True,
        )
        connector = aiohttp.TCPConnector(limit=64)
        timeout = aiohttp.ClientTimeout(total=120)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as http,
            limit,
        ):
            if not args.skip_single or not args.skip_dead:
                store_url = env.store("broker_bench_rev")
                store = env.probe(store_url)
                (broker,) = await env.brokers(
                    http, store_url, 1, max_leases=max(args.n, *DEAD_COUNTS)
                )
                for role in [] if args.skip_single else args.roles.split(","):
                    if role == "dev-db" and not env.setup.database_configured:
                        print("dev-db: not measured (no PostgreSQL for OpenBao)", flush=True)
                        continue
                    row = await one_instance(env, http, broker, store, role, args.n)
                    singles.append(row)
                    print(
                        f"  {role}: broker {row['broker']['done_polled_s']:.2f}s, "
                        f"direct {row['direct']['all_gone_s']:.2f}s, x{row['ratio']:.2f}",
                        flush=True,
                    )
                if not args.skip_dead:
                    if env.setup.database_configured:
                        dead = await terminate_to_dead(env, http, broker, args.dead_runs)
                    else:
                        print("terminate → dead: not measured (no PostgreSQL for OpenBao)")
                env.stop_brokers()
            if not args.skip_fleet:
                store_url = env.store("broker_bench_fleet")
                store = env.probe(store_url)
                replicas = await env.brokers(
                    http, store_url, 2, max_leases=max(3, args.leases_per_instance)
                )
                direct = await fleet_direct(env, http, args.instances, args.leases_per_instance)
                swarm = await fleet(
                    env, http, replicas, store, args.instances, args.leases_per_instance
                )
                swarm["direct"] = direct
        report(singles, swarm, dead, env.crl_auto_rebuild)
        ok = True
    except TimeoutError:
        if not limit.expired():
            raise
        report(singles, swarm, dead, env.crl_auto_rebuild)
        print(f"\nstopped at the {args.time_limit:.0f}s time limit; the rest was not measured")
    finally:
        await env.close()
        if not ok:
            print(f"logs kept in {work}", file=sys.stderr)
    if not ok:
        raise SystemExit(2)
    out = ROOT / ".bench"
    out.mkdir(exist_ok=True)
    (out / "revocation.json").write_text(
        json.dumps({"single": singles, "fleet": swarm, "dead": dead}, indent=2, default=str)
    )
    shutil.rmtree(work, ignore_errors=True)


def report(
    singles: list[dict[str, Any]],
    swarm: dict[str, Any] | None,
    dead: dict[str, Any] | None,
    auto: bool,
) -> None:
    cores = os.cpu_count()
    if dead is not None:
        print(
            f"\nterminate → credential dead (dev-db, PostgreSQL logins), {dead['runs']} runs "
            f"each; ms from the request until every credential's login has failed once"
        )
        print(f"{'leases':>6} | {'broker p50':>10} {'p99':>6} | {'direct p50':>10} {'p99':>6}")
        for k, row in dead["counts"].items():
            b, d = row["broker"], row["direct"]
            print(
                f"{k:>6} | {b['p50_ms']:10.0f} {b['p99_ms']:6.0f} | "
                f"{d['p50_ms']:10.0f} {d['p99_ms']:6.0f}"
            )
        print(
            "broker: POST /v1/instances/{id}/terminate; direct: auth/token/revoke-accessor on "
            f"the instance token; logins {LOGIN_CONCURRENCY} at a time, a sweep every "
            f"{LOGIN_POLL_S * 1000:.0f} ms plus its own time (the resolution for 100 leases)"
        )
    crl = "pki CRL auto_rebuild" if auto else "pki CRL rebuilt on every revocation"
    if singles:
        print(
            f"\none instance, N leases, terminated; OpenBao dev (inmem), {crl}, PostgreSQL "
            f"store, {cores} cores"
        )
        print(
            f"{'role':9} {'N':>5} | {'direct: revoke':>14} {'all gone':>9} {'leases/s':>9} | "
            f"{'broker: done':>12} {'leases/s':>9} | {'x':>5} | "
            f"{'start':>7} {'revoke':>7} {'finish':>7}"
        )
        for r in singles:
            d, b, p = r["direct"], r["broker"], r["broker"]["phases"]
            print(
                f"{r['role']:9} {r['n']:>5} | {d['revoke_call_s']:13.3f}s {d['all_gone_s']:8.2f}s "
                f"{r['n'] / d['all_gone_s']:9.0f} | {b['done_polled_s']:11.2f}s "
                f"{r['n'] / b['done_polled_s']:9.0f} | {r['ratio']:5.2f} | "
                f"{p['start_s']:6.2f}s {p['revoke_s']:6.2f}s {p['finish_s']:6.2f}s"
            )
        print(
            "direct: revoke = auth/token/revoke-accessor returning; all gone = until LIST "
            "sys/leases/lookup shows none of the N\n"
            "broker: done = POST terminate until the job is done (store polled every "
            f"{JOB_POLL_S}s; then GET /v1/instances/{{id}} shows terminated/done, all revoked)\n"
            "x = broker done / direct all gone (target ≤ 1.5)\n"
            "phases, from the store's timestamps: start = job created → first revocation "
            "stamped (claim, work read, lookups); revoke → leases marked revoked (revocations, "
            "the token, Vault's confirmation); finish → job done"
        )
        for r in singles:
            d, b = r["direct"], r["broker"]
            print(
                f"  {r['role']}: CPU s while revoking: direct: OpenBao {d['bao_cpu_s']:.2f}; "
                f"broker: OpenBao {b['bao_cpu_s']:.2f}, broker {b['broker_cpu_s']:.2f}; job "
                f"attempts {b['attempts']}; done per job's completed_at {b['done_server_s']:.2f}s"
            )
            print(
                f"  {r['role']}: one GET /v1/instances/{{id}} with {r['n']} leases: "
                f"{b['get_instance_s'] * 1000:.0f} ms, {b['get_instance_cpu_s'] * 1000:.0f} ms "
                f"broker CPU; issue/s one instance: direct {d['issue_per_s']:.0f}, broker "
                f"{b['issue_per_s']:.0f}"
            )
    if swarm is not None:
        s = swarm
        print(
            f"\nfleet: {s['instances']} instances × {s['leases_per_instance']} leases "
            f"({s['role']}: PKI EC P-256, {crl}), two broker replicas, one PostgreSQL store, "
            f"{cores} cores"
        )
        print(
            f"issue:     {s['instances'] * s['leases_per_instance']} leases in {s['issue_s']:.1f}s "
            f"({s['issue_per_s']:.0f}/s, concurrency {FLEET_CONCURRENCY} over both replicas)"
        )
        print(
            f"terminate: all jobs done {s['revoke_s']:.1f}s after the first request: "
            f"{s['instances_per_s']:.1f} instances/s, {s['leases_per_s']:.0f} leases/s; "
            f"jobs per replica {s['jobs_by_replica']}, retried {s['jobs_retried']}; every "
            f"terminate request answered (202) after {s['terminate_accepted_s']:.1f}s"
        )
        print(
            f"CPU s until all done: OpenBao {s['bao_cpu_s']:.1f}, replicas "
            f"{' + '.join(f'{c:.1f}' for c in s['replicas_cpu_s'])} "
            f"({(s['bao_cpu_s'] + sum(s['replicas_cpu_s'])) * 1000 / s['instances']:.1f} ms "
            "per instance, PostgreSQL not counted)"
        )
        d = s["direct"]
        print(
            f"direct:    the same fleet straight against OpenBao (a token per instance, every "
            f"token revoked by accessor, {FLEET_CONCURRENCY} at a time): all leases gone after "
            f"{d['revoke_s']:.1f}s ({d['instances_per_s']:.0f} instances/s, "
            f"{d['leases_per_s']:.0f} leases/s; the revoke calls returned after "
            f"{d['revoke_calls_s']:.1f}s), OpenBao CPU {d['bao_cpu_s']:.1f}s"
        )
        print(
            f"x = broker / direct: {s['revoke_s'] / d['revoke_s']:.2f} "
            f"(issue/s direct {d['issue_per_s']:.0f})"
        )


if __name__ == "__main__":
    asyncio.run(main())
