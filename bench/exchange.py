"""Issuance through the broker vs straight from OpenBao, in the same run.

For each role (dev-cert, dev-db; dev-oidc on request) and concurrency (1, 16) this issues
credentials:
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
Each timed phase issues for --seconds (5 by default; --n-* only bound it), so that its
figures are stable. Right before and after each phase the bench reads from /proc the CPU
time of the `broker serve` process, of OpenBao, of the whole PostgreSQL server (every
postgres process on the machine: other databases' work is in it) and of itself, and the
bench database's pg_stat_database counters, and prints them per credential next to the
throughput, with the broker's CPU over OpenBao's (issue 15's goal). With --rounds R (3 by
default), each role and concurrency is measured R times (direct, then the doors, their
order turning each round); the tables show min/median/max, each ratio taken within its
round first, and every round's own figures follow. --prefill N fills the store first
(bench/prefill.py: N leases, their instances, audit events, used token ids and sightings,
no ANALYZE); --pin puts the broker on CPU 0 and OpenBao and the client on CPU 1.

    python bench/exchange.py [--seconds 5] [--n-cert 20000] [--n-db 4000] [--n-oidc 20000]
        [--roles dev-cert,dev-db[,dev-oidc]] [--door credentials|token|both]
        [--rounds 3] [--store postgresql|sqlite] [--prefill N] [--pin]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
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

from bench import prefill, procstat  # noqa: E402
from bench.procstat import CpuProbe  # noqa: E402
from broker.dev.environment import dev_settings_dict  # noqa: E402
from broker.dev.issuer import DevIssuer  # noqa: E402
from broker.dev.openbao import OpenBaoDevServer, bao_binary, free_port  # noqa: E402
from broker.leases.migrations import migrate  # noqa: E402
from broker.vault.bootstrap import OIDC_ROLE, OIDC_TTL, TOKEN_ROLE, bootstrap_dev  # noqa: E402
from broker.vault.client import entity_alias_name  # noqa: E402
from tests.harness.postgres import find_or_start_postgres  # noqa: E402

PHASE_TIMEOUT_S = 180
# How long after a broker phase its PostgreSQL counters are read: an idle backend reports
# what it counted up to 10 s (PGSTAT_IDLE_INTERVAL) after its last report.
STATS_FLUSH_S = 11.0
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


async def run_phase(  # type: ignore[no-untyped-def]
    n: int, concurrency: int, one, *, seconds: float = 0.0
) -> dict:
    """``one(i)`` for i in 0..n-1, ``concurrency`` at a time. With ``seconds``, new calls
    stop once that much time has passed (in-flight ones finish), so a phase lasts about
    that long whatever the rate; ``n`` then only bounds it."""
    latencies: list[float] = []
    start = time.perf_counter()
    deadline = start + seconds
    claimed = iter(range(n))

    async def worker() -> None:
        for i in claimed:
            t0 = time.perf_counter()
            await one(i)
            latencies.append(time.perf_counter() - t0)
            if seconds and time.perf_counter() >= deadline:
                return

    await asyncio.wait_for(
        asyncio.gather(*(worker() for _ in range(min(concurrency, n)))), PHASE_TIMEOUT_S
    )
    wall = time.perf_counter() - start
    return {
        "n": len(latencies),
        "concurrency": concurrency,
        "seconds": wall,
        "throughput": len(latencies) / wall,
        "p50_ms": pct(latencies, 50) * 1000,
        "p99_ms": pct(latencies, 99) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000,
    }


class PgCounters:
    """The bench database's line of ``pg_stat_database``, read over a connection to another
    database (``postgres``) so that reading it does not count in it. A backend reports its
    counters at most once a second and, once idle, up to PGSTAT_IDLE_INTERVAL (10 s, PG 15+)
    later: a broker phase's figures are read STATS_FLUSH_S after it ends."""

    FIELDS = (
        "xact_commit",
        "xact_rollback",
        "tup_inserted",
        "tup_updated",
        "tup_deleted",
        "tup_fetched",
        "tup_returned",
        "multixacts",
    )

    def __init__(self, admin_url: str, database: str) -> None:
        import psycopg

        self.database = database
        self.conn = psycopg.connect(admin_url, autocommit=True)

    def read(self) -> dict[str, int]:
        fields = self.FIELDS[:-1]
        row = self.conn.execute(
            f"SELECT {', '.join(fields)} FROM pg_stat_database WHERE datname = %s",
            (self.database,),
        ).fetchone()
        assert row is not None
        counters = dict(zip(fields, (int(v) for v in row), strict=True))
        # MultiXacts (several transactions locking one row together, as shared row locks
        # on a busy row do): the server's next id, which only a checkpoint publishes. The
        # whole server's: other databases' work included.
        self.conn.execute("CHECKPOINT")
        mxid = self.conn.execute(
            "SELECT next_multixact_id::text::bigint FROM pg_control_checkpoint()"
        ).fetchone()
        assert mxid is not None
        counters["multixacts"] = int(mxid[0])
        return counters

    def statements_available(self) -> str:
        """Why statements per exchange are (not) counted."""
        loaded = self.conn.execute("SHOW shared_preload_libraries").fetchone()
        if loaded and "pg_stat_statements" in str(loaded[0]):
            return "pg_stat_statements loaded, but not read by this bench"
        return (
            "pg_stat_statements not loaded (shared_preload_libraries is "
            f"'{loaded[0] if loaded else ''}'): statements per exchange not counted"
        )

    def close(self) -> None:
        self.conn.close()


async def timed_phase(  # type: ignore[no-untyped-def]
    n: int,
    concurrency: int,
    one,
    *,
    seconds: float,
    probe: CpuProbe,
    pg: PgCounters | None,
    settle: bool,
) -> dict:
    """``run_phase`` with each party's CPU sampled from /proc right before and after it,
    and the bench database's counters around it (after ``STATS_FLUSH_S`` if ``settle``:
    the broker's backends report late), both per credential."""
    before_pg = pg.read() if pg else None
    before = probe.sample()
    result = await run_phase(n, concurrency, one, seconds=seconds)
    used = probe.sample().minus(before)
    done = max(1, result["n"])
    result["cpu_ms"] = {party: s * 1000 / done for party, s in used.items()}
    if pg and before_pg is not None:
        if settle:
            await asyncio.sleep(STATS_FLUSH_S)
        after_pg = pg.read()
        result["pg"] = {k: (after_pg[k] - before_pg[k]) / done for k in PgCounters.FIELDS}
    return result


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


def spread(values: list[float]) -> tuple[float, float, float]:
    """min, median, max."""
    return min(values), statistics.median(values), max(values)


CPU_PARTIES = ("broker", "openbao", "postgres", "client", "machine")


def round_figures(measured: dict) -> dict[str, dict[str, float]]:
    """One round's figures per path, flat, with the ratios that need the round's direct
    phase beside them: cost x, p50 x and broker CPU over OpenBao CPU, in the same phase
    and in the direct phase (a round's phases ran back to back, on the same load)."""
    direct = measured["direct"]
    out: dict[str, dict[str, float]] = {}
    for path, m in measured.items():
        f = {k: m[k] for k in ("n", "seconds", "throughput", "p50_ms", "p99_ms")}
        f.update({f"cpu_{p}": m["cpu_ms"][p] for p in CPU_PARTIES})
        f.update({f"pg_{k}": v for k, v in m.get("pg", {}).items()})
        if path != "direct":
            f["cost_x"] = direct["throughput"] / m["throughput"]
            f["p50_x"] = m["p50_ms"] / direct["p50_ms"]
            f["broker_over_openbao"] = m["cpu_ms"]["broker"] / max(m["cpu_ms"]["openbao"], 1e-9)
            f["broker_over_direct_openbao"] = m["cpu_ms"]["broker"] / max(
                direct["cpu_ms"]["openbao"], 1e-9
            )
        out[path] = f
    return out


def summarize(role: str, conc: int, doors: list[str], rounds: list[dict]) -> dict:
    """One row per role and concurrency: every figure's min, median and max over the
    rounds, each ratio taken within its round first."""
    figures = [round_figures(r) for r in rounds]
    paths: dict[str, dict[str, tuple[float, float, float]]] = {}
    for path in ["direct", *doors]:
        keys = figures[0][path].keys()
        paths[path] = {k: spread([f[path][k] for f in figures]) for k in keys}
    row: dict[str, Any] = {"role": role, "concurrency": conc, "paths": paths, "rounds": figures}
    if len(doors) == len(DOORS):
        row["token_vs_credentials"] = statistics.median(
            f["token"]["throughput"] / f["credentials"]["throughput"] for f in figures
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
    *,
    seconds: float,
    probe: CpuProbe,
    pg: PgCounters | None,
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
        measured = {
            "direct": await timed_phase(
                count,
                conc,
                lambda i, c=direct: c.issue(role, i),
                seconds=seconds,
                probe=probe,
                pg=pg,
                settle=False,
            )
        }
        # The doors' order turns each round: neither always runs right after direct.
        for door in doors[k % len(doors) :] + doors[: k % len(doors)]:
            via = ViaBroker(http, url, issuer, f"{tag}-{door}", count, door)
            measured[door] = await timed_phase(
                count,
                conc,
                lambda i, c=via: c.issue(role, i),
                seconds=seconds,
                probe=probe,
                pg=pg,
                settle=True,
            )
        results.append(measured)
    return summarize(role, conc, doors, results)


def _mmm(s: tuple[float, float, float], fmt: str) -> str:
    return "/".join(format(v, fmt) for v in s)


def _med(s: tuple[float, float, float], fmt: str) -> str:
    """The median, and the range when the rounds differ."""
    lo, med, hi = s
    return f"{med:{fmt}} ({lo:{fmt}}-{hi:{fmt}})"


def print_table(rows: list[dict], store: str, rounds: int) -> None:
    print(f"\n== throughput and latency: min/median/max of {rounds} rounds, store={store}")
    print(
        f"{'role':9} {'conc':>4} {'path':11} | {'credentials/s':>19} | {'p50 ms':>19} | "
        f"{'p99 ms':>6} | {'cost x':>14} | {'p50 x':>5} | {'n':>6} {'s':>5}"
    )
    for r in rows:
        for path, f in r["paths"].items():
            cost = _mmm(f["cost_x"], ".2f") if "cost_x" in f else ""
            p50x = format(f["p50_x"][1], ".2f") if "p50_x" in f else ""
            print(
                f"{r['role']:9} {r['concurrency']:>4} {path:11} | "
                f"{_mmm(f['throughput'], '.0f'):>19} | {_mmm(f['p50_ms'], '.1f'):>19} | "
                f"{f['p99_ms'][1]:6.1f} | {cost:>14} | {p50x:>5} | "
                f"{f['n'][1]:6.0f} {f['seconds'][1]:5.1f}"
            )
    print(
        "cost x = direct throughput / broker throughput (1.0 = free); p50 x = broker p50 / "
        "direct p50; p99, p50 x, n and s (phase length) are medians"
    )
    pairs = [r for r in rows if "token_vs_credentials" in r]
    if pairs:
        print(
            "token door / credentials door throughput: "
            + ", ".join(
                f"{r['role']} {r['concurrency']}: {r['token_vs_credentials']:.2f}" for r in pairs
            )
        )

    print(f"\n== CPU ms per credential from /proc: median (min-max) of {rounds} rounds")
    print(
        f"{'role':9} {'conc':>4} {'path':11} | {'broker':>19} | {'OpenBao':>19} | "
        f"{'PostgreSQL*':>19} | {'client':>19} | {'machine':>19} | "
        f"{'broker÷OpenBao':>19} | {'÷OpenBao direct':>19}"
    )
    for r in rows:
        for path, f in r["paths"].items():
            ratios = (
                f"{_med(f['broker_over_openbao'], '.2f'):>19} | "
                f"{_med(f['broker_over_direct_openbao'], '.2f'):>19}"
                if "broker_over_openbao" in f
                else f"{'':>19} | {'':>19}"
            )
            print(
                f"{r['role']:9} {r['concurrency']:>4} {path:11} | "
                + " | ".join(f"{_med(f['cpu_' + p], '.2f'):>19}" for p in CPU_PARTIES)
                + f" | {ratios}"
            )
    print(
        "broker÷OpenBao: the broker's CPU over OpenBao's in the same phase; ÷OpenBao direct: "
        "over OpenBao's in the round's direct phase\n"
        "* PostgreSQL = the whole server (every postgres process on the machine, other "
        "databases' work included); machine = all CPUs' busy time (/proc/stat), everyone's"
    )

    if any("pg_xact_commit" in f for r in rows for f in r["paths"].values()):
        print(
            f"\n== PostgreSQL per credential, bench database (pg_stat_database): median "
            f"(min-max) of {rounds} rounds; broker phases read {STATS_FLUSH_S:.0f} s after "
            "they end (the broker's background jobs in that time included)"
        )
        fields = [f"pg_{k}" for k in PgCounters.FIELDS]
        print(f"{'role':9} {'conc':>4} {'path':11} | " + " | ".join(f"{k[3:]:>19}" for k in fields))
        for r in rows:
            for path, f in r["paths"].items():
                if path == "direct":
                    continue
                print(
                    f"{r['role']:9} {r['concurrency']:>4} {path:11} | "
                    + " | ".join(f"{_med(f[k], '.2f'):>19}" for k in fields)
                )


def print_raw(rows: list[dict]) -> None:
    """Every repetition's own figures, as measured."""
    print("\n== every round (CPU in ms per credential; xact = commits per credential)")
    print(
        f"{'role':9} {'conc':>4} {'rd':>2} {'path':11} | {'n':>6} {'s':>5} {'cred/s':>7} "
        f"{'p50':>6} {'p99':>6} | {'broker':>6} {'bao':>6} {'pg':>6} {'client':>6} "
        f"{'machine':>7} | {'b÷bao':>5} {'cost x':>6} {'xact':>5}"
    )
    for r in rows:
        for k, figures in enumerate(r["rounds"]):
            for path, f in figures.items():
                print(
                    f"{r['role']:9} {r['concurrency']:>4} {k + 1:>2} {path:11} | "
                    f"{f['n']:6.0f} {f['seconds']:5.1f} {f['throughput']:7.0f} "
                    f"{f['p50_ms']:6.1f} {f['p99_ms']:6.1f} | {f['cpu_broker']:6.2f} "
                    f"{f['cpu_openbao']:6.2f} {f['cpu_postgres']:6.2f} {f['cpu_client']:6.2f} "
                    f"{f['cpu_machine']:7.2f} | "
                    + (
                        f"{f['broker_over_openbao']:5.2f} {f['cost_x']:6.2f}"
                        if "cost_x" in f
                        else f"{'':5} {'':6}"
                    )
                    + (f" {f['pg_xact_commit']:5.2f}" if "pg_xact_commit" in f else "")
                )


def machine_lines() -> list[str]:
    return [
        f"machine: {os.cpu_count()} cores, {procstat.cpu_model()}, Python "
        f"{platform.python_version()}, {procstat.command_version(bao_binary())}",
    ]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-cert", type=int, default=20000, help="at most this many per phase")
    ap.add_argument("--n-db", type=int, default=4000, help="at most this many per phase")
    ap.add_argument("--n-oidc", type=int, default=20000, help="at most this many per phase")
    ap.add_argument(
        "--seconds",
        type=float,
        default=5.0,
        help="each timed phase issues for this long (bounded by --n-*); 0: exactly --n-*",
    )
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
    ap.add_argument("--rounds", type=int, default=3, help="measurements per role and concurrency")
    ap.add_argument("--store", choices=["postgresql", "sqlite"], default="postgresql")
    ap.add_argument(
        "--prefill",
        type=int,
        default=0,
        metavar="N",
        help="first fill the PostgreSQL store with N leases and their instances, audit "
        "events, used token ids and sightings (bench/prefill.py)",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="pin the broker to CPU 0, OpenBao and this client to CPU 1",
    )
    args = ap.parse_args()
    roles = [r for r in args.roles.split(",") if r]
    if not roles or set(roles) - set(ROLES):
        ap.error(f"--roles: choose from {', '.join(ROLES)}")
    if not 1 <= args.rounds <= 10:
        ap.error("--rounds: 1 to 10")
    if not 0 <= args.seconds <= 60:
        ap.error("--seconds: 0 to 60")
    if args.prefill and args.store != "postgresql":
        ap.error("--prefill: PostgreSQL store only")
    if not 0 <= args.prefill <= 10_000_000:
        ap.error("--prefill: 0 to 10,000,000")
    if args.pin and (os.cpu_count() or 1) < 2:
        ap.error("--pin: needs two CPUs")
    doors = list(DOORS) if args.door == "both" else [args.door]
    counts = {"dev-cert": args.n_cert, "dev-db": args.n_db, OIDC_ROLE: args.n_oidc}
    with_oidc = OIDC_ROLE in roles
    header = machine_lines()
    header.append(f"load average at start: {procstat.load_average()}")

    work = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    os.chmod(work, 0o755)
    pg = find_or_start_postgres(work)
    bao = OpenBaoDevServer(work / "openbao")
    bao.start()
    proc = None
    db_name = None
    issuer_runner = None
    counters: PgCounters | None = None
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
        store_line = f"store: {args.store}"
        if args.prefill:
            took = prefill.prefill(store_url, args.prefill)
            rows_now = prefill.table_rows(store_url)
            store_line += (
                f", prefilled in {took['total']:.1f} s ("
                + ", ".join(f"{t} {took[t]:.1f} s" for t in took if t != "total")
                + "): "
                + ", ".join(f"{t} {c:,}" for t, c in rows_now.items())
                + "; audit hashes are placeholders (not a valid chain); no ANALYZE run"
            )
        else:
            store_line += ", empty at the start"
        header.append(store_line)
        port = free_port()
        cfg = bench_config(bao, setup, issuer, store_url, port, with_oidc=with_oidc)
        proc = start_broker(cfg, work)
        url = f"http://127.0.0.1:{port}"
        # The broker's instance tokens then carry an entity alias; so do the direct path's.
        entity_alias = entity_alias_name("bench-direct", "payments") if with_oidc else None
        assert bao.proc is not None
        probe = CpuProbe(broker_pid=proc.pid, openbao_pid=bao.proc.pid)
        if db_name:
            counters = PgCounters(pg.admin_url, db_name)
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector) as http:
            await wait_ready(http, url, work)
            if args.pin:
                # After start-up, so threads started meanwhile are pinned too; later ones
                # inherit it. PostgreSQL is the machine's shared server: not pinned.
                procstat.pin(proc.pid, {0})
                procstat.pin(bao.proc.pid, {1})
                procstat.pin(os.getpid(), {1})
            header.append(
                f"run: rounds {args.rounds}, phases of {args.seconds:g} s each (at most "
                + ", ".join(f"{r} {counts[r]:,}" for r in roles)
                + f" credentials), concurrency 1 and 16, doors {'+'.join(doors)}, "
                f"{PER_INSTANCE} credentials per instance, OpenBao dev (inmem), "
                + (
                    "pinned: broker on CPU 0, OpenBao and client on CPU 1, PostgreSQL "
                    "unpinned (the machine's shared server)"
                    if args.pin
                    else "unpinned"
                )
            )
            header.append(
                "not measured as deployed: the dev issuer's replay protection is off (one JWT "
                "serves an instance's 10 exchanges), so seen_tokens is not written per "
                "exchange; durability, audit and metrics are on"
            )
            header.append(
                "CPU: utime+stime from /proc/PID/stat (all threads) right before and after "
                "each phase: broker = the `broker serve` process, OpenBao = its process, "
                "PostgreSQL = the whole server, client = this process (load generator)"
            )
            if counters:
                header.append(f"PostgreSQL counters: {counters.statements_available()}")

            rows = []
            for role in roles:
                if role == "dev-db" and not setup.database_configured:
                    continue
                n = counts[role]
                for conc in (1, 16):
                    count = n if conc > 1 or args.seconds else max(20, n // 4)
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
                            seconds=args.seconds,
                            probe=probe,
                            pg=counters,
                        )
                    )

        header.append(f"load average at end: {procstat.load_average()}")
        if db_name and args.prefill:
            header.append(
                "analyzed by PostgreSQL (autovacuum) by the end: "
                + ", ".join(f"{t} {at}" for t, at in prefill.analyzed(store_url).items())
            )
        print()
        for line in header:
            print(line)
        print_table(rows, args.store, args.rounds)
        print_raw(rows)
        out = ROOT / ".bench"
        out.mkdir(exist_ok=True)
        (out / f"exchange-{args.store}.json").write_text(
            json.dumps({"conditions": header, "rows": rows}, indent=2)
        )
    finally:
        if counters is not None:
            with contextlib.suppress(Exception):
                counters.close()
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
