"""Issuance through the broker vs straight from OpenBao, in the same run.

For each role (dev-cert, dev-db; dev-oidc on request) and concurrency (1, 16) this issues
N credentials:
- direct: the client creates an orphan token per instance through the same token role the
  broker uses (first request of each instance) and reads the credential with it;
- broker, through one or both doors to the same issuance: the client sends a dev-issuer
  JWT per instance to `POST /v1/credentials` (as a bearer token, JSON body) or to
  `POST /v1/token` (RFC 8693: the JWT as `subject_token` in a form, the role as
  `audience`); the broker verifies it, applies policy, records the lease (PostgreSQL
  store by default) and asks OpenBao with its own per-instance token.
All paths spread requests over the same number of instances (new ones every round). With
dev-oidc the broker's instance tokens carry an entity alias (an OIDC token needs an
entity), and so do the direct path's, for every role. The broker runs as its own
`broker serve` process, so client and broker do not share an event loop. Everything is on
loopback; every phase is bounded in count and time. Leases are revoked at the end.
With --rounds R, each role and concurrency is measured R times (direct, then the doors,
their order turning each round); the table shows medians, and cost x is the median of
each round's own ratio.

    python bench/exchange.py [--n-cert 400] [--n-db 160] [--n-oidc 400]
        [--roles dev-cert,dev-db[,dev-oidc]] [--door credentials|token|both]
        [--rounds 1] [--store postgresql|sqlite]
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
from broker.vault.bootstrap import OIDC_ROLE, OIDC_TTL, TOKEN_ROLE, bootstrap_dev  # noqa: E402
from broker.vault.client import entity_alias_name  # noqa: E402
from tests.harness.postgres import find_or_start_postgres  # noqa: E402

PHASE_TIMEOUT_S = 180
PER_INSTANCE = 10  # credentials per simulated instance
DOORS = ("credentials", "token")
ROLES = ("dev-cert", "dev-db", OIDC_ROLE)
# What `POST /v1/credentials` asks for: each role's default TTL, which `POST /v1/token`
# (no ttl in its form) gets anyway. dev-oidc's token cannot outlive its OpenBao role's 5m.
CREDENTIALS_TTL = {"dev-cert": "10m", "dev-db": "10m", OIDC_ROLE: OIDC_TTL}
# RFC 8693's names (broker.api.oauth holds them too; the bench speaks as a client would).
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"


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
        *,
        entity_alias: str | None = None,
    ) -> None:
        self.http, self.addr, self.root, self.tag = http, addr, root, tag
        self.policies = list(policies)
        # As the broker's vault.entity_alias: workload, one entity shared by all instances.
        self.entity_alias = entity_alias
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
                        **({"entity_alias": self.entity_alias} if self.entity_alias else {}),
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
        elif role == OIDC_ROLE:
            req = self.http.get(
                f"{self.addr}/v1/identity/oidc/token/{OIDC_ROLE}", headers={"X-Vault-Token": tok}
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
        self,
        http: aiohttp.ClientSession,
        url: str,
        issuer: DevIssuer,
        tag: str,
        n: int,
        door: str = "credentials",
    ) -> None:
        self.http, self.url, self.door = http, url, door
        # Identity tokens are minted before timing starts: the workload brings its own.
        self.tokens = [
            issuer.mint(instance=f"b-{tag}-{k}", workload="payments", ttl=1800)
            for k in range(n // PER_INSTANCE + 1)
        ]

    async def issue(self, role: str, i: int, caller: dict | None = None) -> None:
        if self.door == "token":
            await self.exchange(role, i)
            return
        async with self.http.post(
            f"{self.url}/v1/credentials",
            json={"role": role, "ttl": CREDENTIALS_TTL.get(role, "10m"), **(caller or {})},
            headers={"Authorization": f"Bearer {self.tokens[i // PER_INSTANCE]}"},
        ) as resp:
            assert resp.status == 201, await resp.text()
            await resp.read()

    async def exchange(self, role: str, i: int) -> None:
        """The same issuance through `POST /v1/token`: a form, the role as audience."""
        async with self.http.post(
            f"{self.url}/v1/token",
            data={
                "grant_type": GRANT_TYPE,
                "subject_token": self.tokens[i // PER_INSTANCE],
                "subject_token_type": JWT_TYPE,
                "audience": role,
            },
        ) as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()


def bench_config(
    bao: OpenBaoDevServer,
    setup: Any,
    issuer: DevIssuer,
    store_url: str,
    port: int,
    with_oidc: bool = False,
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
        with_oidc=with_oidc,
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


def median_of(rounds: list[dict], path: str, key: str) -> float:
    return statistics.median(r[path][key] for r in rounds)


def summarize(role: str, conc: int, doors: list[str], rounds: list[dict]) -> dict:
    """One table row per role and concurrency: medians over the rounds, and each ratio the
    median of the rounds' own ratios (a round's paths ran back to back, on the same load)."""
    figures = ("throughput", "p50_ms", "p99_ms")
    row: dict[str, Any] = {
        "role": role,
        "concurrency": conc,
        "direct": {k: median_of(rounds, "direct", k) for k in figures},
        "doors": {},
        "rounds": rounds,
    }
    for door in doors:
        row["doors"][door] = {
            **{k: median_of(rounds, door, k) for k in figures},
            "throughput_ratio": statistics.median(
                r["direct"]["throughput"] / r[door]["throughput"] for r in rounds
            ),
            "p50_ratio": statistics.median(
                r[door]["p50_ms"] / r["direct"]["p50_ms"] for r in rounds
            ),
        }
    if len(doors) == len(DOORS):
        row["token_vs_credentials"] = statistics.median(
            r["token"]["throughput"] / r["credentials"]["throughput"] for r in rounds
        )
    return row


async def measure(
    http: aiohttp.ClientSession,
    bao: OpenBaoDevServer,
    url: str,
    issuer: DevIssuer,
    role: str,
    count: int,
    conc: int,
    doors: list[str],
    rounds: int,
    entity_alias: str | None,
) -> dict:
    def direct_for(tag: str) -> Direct:
        return Direct(http, bao.addr, bao.root_token, tag, entity_alias=entity_alias)

    base = f"{role}-{conc}-{secrets.token_hex(3)}"
    # warm-up on other instances: connections, JWKS, code paths, the entity
    warm = "warm-" + base
    warm_d = direct_for(warm)
    await run_phase(20, conc, lambda i: warm_d.issue(role, i))
    for door in doors:
        warm_b = ViaBroker(http, url, issuer, f"{warm}-{door}", 20, door)
        await run_phase(20, conc, lambda i, c=warm_b: c.issue(role, i))
    results = []
    for k in range(rounds):
        tag = f"{base}-r{k}"
        direct = direct_for(tag)
        measured = {"direct": await run_phase(count, conc, lambda i, c=direct: c.issue(role, i))}
        # The doors' order turns each round: neither always runs right after direct.
        for door in doors[k % len(doors) :] + doors[: k % len(doors)]:
            via = ViaBroker(http, url, issuer, f"{tag}-{door}", count, door)
            measured[door] = await run_phase(count, conc, lambda i, c=via: c.issue(role, i))
        results.append(measured)
    return summarize(role, conc, doors, results)


def print_table(rows: list[dict], store: str, rounds: int) -> None:
    print(
        f"\nstore={store}  OpenBao dev (inmem)  {os.cpu_count()} cores  "
        f"{PER_INSTANCE} credentials per instance"
        + (f"  medians of {rounds} rounds" if rounds > 1 else "")
    )
    print(
        f"{'role':9} {'conc':>4} {'door':11} | {'direct/s':>9} {'p50ms':>7} {'p99ms':>7} | "
        f"{'broker/s':>9} {'p50ms':>7} {'p99ms':>7} | {'cost x':>6}"
    )
    for r in rows:
        d = r["direct"]
        for door, b in r["doors"].items():
            print(
                f"{r['role']:9} {r['concurrency']:>4} {door:11} | {d['throughput']:9.0f} "
                f"{d['p50_ms']:7.1f} {d['p99_ms']:7.1f} | {b['throughput']:9.0f} "
                f"{b['p50_ms']:7.1f} {b['p99_ms']:7.1f} | {b['throughput_ratio']:6.2f}"
            )
    print("cost x = direct throughput / broker throughput (1.0 = free)")
    pairs = [r for r in rows if "token_vs_credentials" in r]
    if pairs:
        print(
            "token door / credentials door throughput: "
            + ", ".join(
                f"{r['role']} {r['concurrency']}: {r['token_vs_credentials']:.2f}" for r in pairs
            )
        )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-cert", type=int, default=400)
    ap.add_argument("--n-db", type=int, default=160)
    ap.add_argument("--n-oidc", type=int, default=400)
    ap.add_argument(
        "--roles",
        default="dev-cert,dev-db",
        help=f"comma-separated, of {', '.join(ROLES)} (dev-oidc adds entity aliases)",
    )
    ap.add_argument(
        "--door",
        choices=[*DOORS, "both"],
        default="both",
        help="POST /v1/credentials, POST /v1/token (RFC 8693), or both in the same run",
    )
    ap.add_argument("--rounds", type=int, default=1, help="measurements per role and concurrency")
    ap.add_argument("--store", choices=["postgresql", "sqlite"], default="postgresql")
    args = ap.parse_args()
    roles = [r for r in args.roles.split(",") if r]
    if not roles or set(roles) - set(ROLES):
        ap.error(f"--roles: choose from {', '.join(ROLES)}")
    if not 1 <= args.rounds <= 10:
        ap.error("--rounds: 1 to 10")
    doors = list(DOORS) if args.door == "both" else [args.door]
    counts = {"dev-cert": args.n_cert, "dev-db": args.n_db, OIDC_ROLE: args.n_oidc}
    with_oidc = OIDC_ROLE in roles

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
        cfg = bench_config(bao, setup, issuer, store_url, port, with_oidc=with_oidc)
        proc = start_broker(cfg, work)
        url = f"http://127.0.0.1:{port}"
        # The broker's instance tokens then carry an entity alias; so do the direct path's.
        entity_alias = entity_alias_name("bench-direct", "payments") if with_oidc else None
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector) as http:
            await wait_ready(http, url, work)

            rows = []
            for role in roles:
                if role == "dev-db" and not setup.database_configured:
                    continue
                n = counts[role]
                for conc in (1, 16):
                    count = n if conc > 1 else max(20, n // 4)
                    rows.append(
                        await measure(
                            http,
                            bao,
                            url,
                            issuer,
                            role,
                            count,
                            conc,
                            doors,
                            args.rounds,
                            entity_alias,
                        )
                    )

        print_table(rows, args.store, args.rounds)
        out = ROOT / ".bench"
        out.mkdir(exist_ok=True)
        (out / f"exchange-{args.store}.json").write_text(json.dumps(rows, indent=2))
    finally:
        # Each step on its own: one that fails must not leave the others undone.
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.terminate()
                proc.wait(timeout=20)
        # Revoke everything every path minted, so no PostgreSQL role outlives the run. The
        # CRL is first set to rebuild periodically: by default each certificate revocation
        # rebuilds the whole CRL, and thousands of them (rounds, doors) grow quadratically.
        for path, body in (
            ("pki/config/crl", '{"auto_rebuild": true}'),
            ("sys/leases/revoke-prefix/database/creds/dev-db", '{"sync": true}'),
            ("sys/leases/revoke-prefix/pki/issue/dev-cert", '{"sync": true}'),
        ):
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
                        body,
                        f"{bao.addr}/v1/{path}",
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
