"""Issuance through the broker vs straight from OpenBao, in the same run.

For each role (dev-cert, dev-db) and concurrency (1, 16) this issues N credentials:
- direct: the client creates an orphan token per instance through the same token role the
  broker uses (first request of each instance) and reads the credential with it;
- broker: the client sends a dev-issuer JWT per instance to `POST /v1/credentials`; the
  broker verifies it, applies policy, records the lease (PostgreSQL store by default) and
  asks OpenBao with its own per-instance token.
Both paths spread requests over the same number of instances. The broker runs as its own
`broker serve` process, so client and broker do not share an event loop. Everything is on
loopback; every phase is bounded in count and time. Leases are revoked at the end.

    python bench/exchange.py [--n-cert 400] [--n-db 160] [--store postgresql|sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broker.dev.environment import dev_settings_dict  # noqa: E402
from broker.dev.issuer import DevIssuer  # noqa: E402
from broker.dev.openbao import OpenBaoDevServer, free_port  # noqa: E402
from broker.leases.migrations import migrate  # noqa: E402
from broker.vault.bootstrap import TOKEN_ROLE, bootstrap_dev  # noqa: E402
from tests.harness.postgres import find_or_start_postgres  # noqa: E402

PHASE_TIMEOUT_S = 180
PER_INSTANCE = 10  # credentials per simulated instance


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    k = max(0, min(len(values) - 1, round(p / 100 * (len(values) - 1))))
    return values[k]


async def run_phase(n: int, concurrency: int, one) -> dict:  # type: ignore[no-untyped-def]
    latencies: list[float] = []
    sem = asyncio.Semaphore(concurrency)

    async def task(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            await one(i)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(task(i) for i in range(n))), PHASE_TIMEOUT_S)
    wall = time.perf_counter() - start
    return {
        "n": n,
        "concurrency": concurrency,
        "throughput": n / wall,
        "p50_ms": pct(latencies, 50) * 1000,
        "p99_ms": pct(latencies, 99) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000,
    }


class Direct:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        addr: str,
        root: str,
        tag: str,
        policies: tuple[str, ...] = ("broker-instance",),
    ) -> None:
        self.http, self.addr, self.root, self.tag = http, addr, root, tag
        self.policies = list(policies)
        self.tokens: dict[str, str] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    async def token(self, instance: str) -> str:
        lock = self.locks.setdefault(instance, asyncio.Lock())
        async with lock:
            if instance not in self.tokens:
                async with self.http.post(
                    f"{self.addr}/v1/auth/token/create/{TOKEN_ROLE}",
                    headers={"X-Vault-Token": self.root},
                    json={
                        "policies": self.policies,
                        "no_default_policy": True,
                        "ttl": "86400s",
                        "renewable": False,
                        "meta": {"instance_id": instance},
                    },
                ) as resp:
                    assert resp.status == 200, await resp.text()
                    self.tokens[instance] = (await resp.json())["auth"]["client_token"]
            return self.tokens[instance]

    async def issue(self, role: str, i: int) -> None:
        instance = f"d-{self.tag}-{i // PER_INSTANCE}"
        tok = await self.token(instance)
        if role == "dev-cert":
            req = self.http.post(
                f"{self.addr}/v1/pki/issue/dev-cert",
                headers={"X-Vault-Token": tok},
                json={"common_name": "payments.workload.internal", "ttl": "600s"},
            )
        else:
            req = self.http.get(
                f"{self.addr}/v1/database/creds/dev-db", headers={"X-Vault-Token": tok}
            )
        async with req as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()


class ViaBroker:
    def __init__(
        self, http: aiohttp.ClientSession, url: str, issuer: DevIssuer, tag: str, n: int
    ) -> None:
        self.http, self.url = http, url
        # Identity tokens are minted before timing starts: the workload brings its own.
        self.tokens = [
            issuer.mint(instance=f"b-{tag}-{k}", workload="payments", ttl=1800)
            for k in range(n // PER_INSTANCE + 1)
        ]

    async def issue(self, role: str, i: int, caller: dict | None = None) -> None:
        async with self.http.post(
            f"{self.url}/v1/credentials",
            json={"role": role, "ttl": "10m", **(caller or {})},
            headers={"Authorization": f"Bearer {self.tokens[i // PER_INSTANCE]}"},
        ) as resp:
            assert resp.status == 201, await resp.text()
            await resp.read()


def bench_config(
    bao: OpenBaoDevServer, setup: Any, issuer: DevIssuer, store_url: str, port: int
) -> dict[str, Any]:
    """The dev settings for a bench broker: quiet, and every instance keeps all the
    credentials it asks for (no lease-limit replacement inside a measurement)."""
    cfg = dev_settings_dict(
        vault_addr=bao.addr,
        broker_token=setup.broker_token,
        issuer=issuer.issuer,
        jwks_uri=f"{issuer.issuer}/.well-known/jwks.json",
        store_url=store_url,
        admin_token_sha256=hashlib.sha256(secrets.token_bytes(16)).hexdigest(),
        with_database=setup.database_configured,
        port=port,
    )
    cfg["log_level"] = "warning"
    for role in cfg["roles"].values():
        role["max_leases_per_instance"] = PER_INSTANCE
    return cfg


def start_broker(cfg: dict[str, Any], work: Path) -> subprocess.Popen[bytes]:
    """`broker serve` as its own process, so client and broker share no event loop."""
    (work / "broker.yaml").write_text(yaml.safe_dump(cfg))
    with open(work / "broker.log", "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker.cli.main",
                "serve",
                "--config",
                str(work / "broker.yaml"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


async def wait_ready(http: aiohttp.ClientSession, url: str, work: Path) -> None:
    for _ in range(200):
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{url}/readyz") as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise SystemExit(f"broker did not start; see {work / 'broker.log'}")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-cert", type=int, default=400)
    ap.add_argument("--n-db", type=int, default=160)
    ap.add_argument("--store", choices=["postgresql", "sqlite"], default="postgresql")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    os.chmod(work, 0o755)
    pg = find_or_start_postgres(work)
    bao = OpenBaoDevServer(work / "openbao")
    bao.start()
    proc = None
    db_name = None
    issuer_runner = None
    try:
        setup = bootstrap_dev(bao.addr, bao.root_token, postgres_url=pg.admin_url)
        iport = free_port()
        issuer = DevIssuer.generate(f"http://127.0.0.1:{iport}")
        issuer_runner = web.AppRunner(issuer.app(), access_log=None)
        await issuer_runner.setup()
        await web.TCPSite(issuer_runner, "127.0.0.1", iport).start()

        if args.store == "postgresql":
            db_name = pg.create_database("broker_bench")
            store_url = pg.url(db_name)
        else:
            store_url = f"sqlite:///{work / 'bench.db'}"
        migrate(store_url)
        port = free_port()
        proc = start_broker(bench_config(bao, setup, issuer, store_url, port), work)
        url = f"http://127.0.0.1:{port}"
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector) as http:
            await wait_ready(http, url, work)

            rows = []
            for role, n in (("dev-cert", args.n_cert), ("dev-db", args.n_db)):
                if role == "dev-db" and not setup.database_configured:
                    continue
                for conc in (1, 16):
                    count = n if conc > 1 else max(20, n // 4)
                    tag = f"{role}-{conc}-{secrets.token_hex(3)}"
                    direct = Direct(http, bao.addr, bao.root_token, tag)
                    broker = ViaBroker(http, url, issuer, tag, count)
                    # warm-up on other instances: connections, JWKS, code paths
                    warm_d = Direct(http, bao.addr, bao.root_token, "warm-" + tag)
                    warm_b = ViaBroker(http, url, issuer, "warm-" + tag, 20)
                    await run_phase(20, conc, lambda i, c=warm_d, r=role: c.issue(r, i))
                    await run_phase(20, conc, lambda i, c=warm_b, r=role: c.issue(r, i))
                    d = await run_phase(count, conc, lambda i, c=direct, r=role: c.issue(r, i))
                    b = await run_phase(count, conc, lambda i, c=broker, r=role: c.issue(r, i))
                    rows.append(
                        {
                            "role": role,
                            "concurrency": conc,
                            "direct": d,
                            "broker": b,
                            "throughput_ratio": d["throughput"] / b["throughput"],
                            "p50_ratio": b["p50_ms"] / d["p50_ms"],
                        }
                    )

        print(
            f"\nstore={args.store}  OpenBao dev (inmem)  {os.cpu_count()} cores  "
            f"{PER_INSTANCE} credentials per instance"
        )
        print(
            f"{'role':9} {'conc':>4} | {'direct/s':>9} {'p50ms':>7} {'p99ms':>7} | "
            f"{'broker/s':>9} {'p50ms':>7} {'p99ms':>7} | {'cost x':>6}"
        )
        for r in rows:
            d, b = r["direct"], r["broker"]
            print(
                f"{r['role']:9} {r['concurrency']:>4} | {d['throughput']:9.0f} "
                f"{d['p50_ms']:7.1f} {d['p99_ms']:7.1f} | {b['throughput']:9.0f} "
                f"{b['p50_ms']:7.1f} {b['p99_ms']:7.1f} | {r['throughput_ratio']:6.2f}"
            )
        print("cost x = direct throughput / broker throughput (1.0 = free)")
        out = ROOT / ".bench"
        out.mkdir(exist_ok=True)
        (out / f"exchange-{args.store}.json").write_text(json.dumps(rows, indent=2))
    finally:
        # Each step on its own: one that fails must not leave the others undone.
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.terminate()
                proc.wait(timeout=20)
        # Revoke everything both paths minted, so no PostgreSQL role outlives the run.
        for prefix in ("database/creds/dev-db", "pki/issue/dev-cert"):
            with contextlib.suppress(Exception):
                subprocess.run(
                    [
                        "curl",
                        "-s",
                        "-o",
                        "/dev/null",
                        "-X",
                        "PUT",
                        "-H",
                        f"X-Vault-Token: {bao.root_token}",
                        "-d",
                        '{"sync": true}',
                        f"{bao.addr}/v1/sys/leases/revoke-prefix/{prefix}",
                    ],
                    check=False,
                    timeout=300,
                )
        if issuer_runner is not None:
            with contextlib.suppress(Exception):
                await issuer_runner.cleanup()
        with contextlib.suppress(Exception):
            bao.stop()
        if db_name:
            with contextlib.suppress(Exception):
                pg.drop_database(db_name)
        pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
