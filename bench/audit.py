"""What the audit chain costs the exchange: throughput with the chain and without it, in
the same run, on the PostgreSQL store.

Two brokers run at once, each as its own `broker serve` process on its own fresh database
with the same settings:
- chained: the broker as shipped. Every exchange writes its ``lease.issued`` event, and
  the transaction appends it to the chain at its end (the ``audit_head`` row locked, the
  event hashed, inserted, the head moved) — ``sql.common.flush_audit``;
- unchained: the same broker with ``flush_audit`` replaced (a bench-only monkeypatch in
  this file's ``--serve-unchained`` launcher) by a plain insert of each event, numbered
  by a counter in the process, with empty hashes: no head row read, locked or updated,
  nothing hashed. The event itself is still written, so the difference is the chain.
The client measures them in alternating rounds (chained, unchained, chained, …) so a
drift of the machine's load hits both alike; each round issues N PKI certificates (the
fastest engine, where the broker's own cost shows most) at concurrency 16 over fresh
instances. Reported: each round, the median per mode, and the cost of the chain (1 - the
median of the rounds' chained/unchained ratios). Bounded in rounds, count and time;
leases revoked at the end.

    python bench/audit.py [--n 200] [--rounds 8] [--concurrency 16]

``--store-only`` measures the store alone, in this process, without HTTP or Vault: the
issuance's two transactions (``begin_issue``, ``complete_issue`` with its ``lease.issued``
event) at the same concurrency, chained and unchained phases alternating on one database,
so the chain's cost in the store is seen apart from the rest of a loaded machine.

    python bench/audit.py --store-only [--n 1000] [--rounds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.exchange import ViaBroker, bench_config, run_phase, wait_ready  # noqa: E402
from broker.dev.issuer import DevIssuer  # noqa: E402
from broker.dev.openbao import OpenBaoDevServer, free_port  # noqa: E402
from broker.leases.migrations import migrate  # noqa: E402
from broker.vault.bootstrap import bootstrap_dev  # noqa: E402
from tests.harness.postgres import find_or_start_postgres  # noqa: E402

ROLE = "dev-cert"


def serve_unchained(config: str) -> None:
    """`broker serve`, with the chain's append replaced by a plain insert (bench only)."""
    from broker.cli import main as cli
    from broker.leases import database

    database.flush_audit = plain_flush()  # type: ignore[assignment]
    sys.exit(cli.main(["serve", "--config", config]))


def plain_flush() -> Any:
    """The unchained append: each event inserted as it is, numbered by a counter in the
    process, no head row, no hash."""
    from broker.leases.sql import common

    numbers = itertools.count(10**12)  # apart from the chained events of the same store

    async def plain_insert(conn: Any) -> int:
        pending = conn.info.pop(common.AUDIT_PENDING, None) or []
        clock = conn.info.pop(common.AUDIT_CLOCK, None)
        if not pending or clock is None:
            return 0
        at = clock.now()
        rows = [
            {
                "seq": next(numbers),
                "at": at,
                "actor": e.actor,
                "action": e.action,
                "instance_id": e.instance_id,
                "lease_id": e.lease_id,
                "outcome": e.outcome,
                "reason": e.reason,
                "detail": dict(e.detail),
                "prev_hash": "",
                "hash": "",
            }
            for e in pending
        ]
        await conn.execute(common.AUDIT_EVENTS.insert(), rows)
        return len(rows)

    return plain_insert


async def store_only(args: argparse.Namespace) -> None:
    from datetime import UTC, datetime, timedelta

    from broker.clock import SystemClock
    from broker.leases import Database, Ledgers, database
    from broker.leases.settings import StoreSettings

    work = Path(tempfile.mkdtemp(prefix="broker-bench-audit-"))
    os.chmod(work, 0o755)
    pg = find_or_start_postgres(work)
    name = pg.create_database("broker_bench_store")
    chained, unchained = database.flush_audit, plain_flush()
    db = Database(StoreSettings(url=pg.url(name), pool_size=args.concurrency))
    try:
        migrate(pg.url(name))
        await db.start()
        ledgers = Ledgers.on(db, SystemClock(), token_key=b"k" * 32)
        later = datetime.now(UTC) + timedelta(hours=1)

        async def one(tag: str, i: int) -> None:
            ticket = await ledgers.issuance.begin_issue(
                instance_id=f"{tag}-{i // 10}",
                issuer_name="dev",
                workload="payments",
                role="dev-cert",
                kind="x509_certificate",
            )
            await ledgers.issuance.complete_issue(
                ticket.lease_id,
                vault_lease_id=f"pki/issue/dev-cert/{ticket.lease_id}",
                accessor="acc",
                renewable=False,
                issued_at=later,
                expires_at=later,
                engine="pki",
                token_id=("dev", f"jti-{tag}-{i}"),
            )

        results: dict[str, list[dict[str, Any]]] = {"chained": [], "unchained": []}
        for r in range(args.rounds + 1):  # round 0 warms up
            order = ("chained", "unchained") if r % 2 == 0 else ("unchained", "chained")
            for mode in order:
                database.flush_audit = chained if mode == "chained" else unchained  # type: ignore[assignment]
                tag = f"{mode}-{r}"
                phase = await run_phase(args.n, args.concurrency, lambda i, t=tag: one(t, i))
                if r:
                    results[mode].append(phase)
        report(
            results,
            f"the store alone (begin_issue + complete_issue), PostgreSQL, "
            f"concurrency {args.concurrency}, {args.n} per round",
        )
    finally:
        database.flush_audit = chained
        await db.close()
        pg.drop_database(name)
        pg.stop()


def report(results: dict[str, list[dict[str, Any]]], what: str) -> None:
    med = {m: statistics.median(p["throughput"] for p in ps) for m, ps in results.items()}
    # Each round's two phases ran back to back: their ratio is what the machine's load,
    # which drifts over a run (other work shares the cores), disturbs least.
    ratios = [
        c["throughput"] / u["throughput"]
        for c, u in zip(results["chained"], results["unchained"], strict=True)
    ]
    cost = 1 - statistics.median(ratios)
    print(f"\n{what}, {os.cpu_count()} cores")
    print(
        f"{'round':>5} | {'chained/s':>9} {'p50ms':>7} | {'unchained/s':>11} {'p50ms':>7} "
        f"| {'ratio':>5}"
    )
    for r, ratio in enumerate(ratios):
        c, u = results["chained"][r], results["unchained"][r]
        print(
            f"{r:>5} | {c['throughput']:9.0f} {c['p50_ms']:7.1f} | "
            f"{u['throughput']:11.0f} {u['p50_ms']:7.1f} | {ratio:5.3f}"
        )
    print(
        f"median: chained {med['chained']:.0f}/s, unchained {med['unchained']:.0f}/s "
        f"({(1 - med['chained'] / med['unchained']) * 100:.1f}% apart); median ratio of the "
        f"rounds {statistics.median(ratios):.3f}: chain cost {cost * 100:.1f}% (goal < 10%)"
    )
    out = ROOT / ".bench"
    out.mkdir(exist_ok=True)
    name = "audit-store.json" if "store alone" in what else "audit.json"
    (out / name).write_text(
        json.dumps({"rounds": results, "median": med, "ratios": ratios, "cost": cost}, indent=2)
    )


def start(cfg: dict[str, Any], work: Path, name: str, *, unchained: bool) -> Any:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = (
        [sys.executable, __file__, "--serve-unchained", str(path)]
        if unchained
        else [sys.executable, "-m", "broker.cli.main", "serve", "--config", str(path)]
    )
    with open(work / f"{name}.log", "wb") as log:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--store-only", action="store_true")
    args = ap.parse_args()
    if args.store_only:
        await store_only(args)
        return

    work = Path(tempfile.mkdtemp(prefix="broker-bench-audit-"))
    os.chmod(work, 0o755)
    pg = find_or_start_postgres(work)
    bao = OpenBaoDevServer(work / "openbao")
    bao.start()
    procs: list[Any] = []
    dbs: list[str] = []
    issuer_runner = None
    try:
        setup = bootstrap_dev(bao.addr, bao.root_token, postgres_url=pg.admin_url)
        iport = free_port()
        issuer = DevIssuer.generate(f"http://127.0.0.1:{iport}")
        issuer_runner = web.AppRunner(issuer.app(), access_log=None)
        await issuer_runner.setup()
        await web.TCPSite(issuer_runner, "127.0.0.1", iport).start()

        urls = {}
        for mode in ("chained", "unchained"):
            name = pg.create_database(f"broker_bench_{mode}")
            dbs.append(name)
            migrate(pg.url(name))
            port = free_port()
            cfg = bench_config(bao, setup, issuer, pg.url(name), port)
            procs.append(start(cfg, work, mode, unchained=mode == "unchained"))
            urls[mode] = f"http://127.0.0.1:{port}"

        results: dict[str, list[dict[str, Any]]] = {"chained": [], "unchained": []}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
            for mode, url in urls.items():
                await wait_ready(http, url, work)
                warm = ViaBroker(http, url, issuer, f"warm-{mode}", 40)
                await run_phase(40, args.concurrency, lambda i, c=warm: c.issue(ROLE, i))
            for r in range(args.rounds):
                order = ("chained", "unchained") if r % 2 == 0 else ("unchained", "chained")
                for mode in order:
                    tag = f"{mode}-{r}-{secrets.token_hex(3)}"
                    client = ViaBroker(http, urls[mode], issuer, tag, args.n)
                    phase = await run_phase(
                        args.n, args.concurrency, lambda i, c=client: c.issue(ROLE, i)
                    )
                    results[mode].append(phase)

        report(
            results,
            f"exchange ({ROLE}) via the broker, PostgreSQL store, concurrency "
            f"{args.concurrency}, {args.n} per round",
        )
    finally:
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.terminate()
                proc.wait(timeout=20)
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
                    f"{bao.addr}/v1/sys/leases/revoke-prefix/pki/issue/{ROLE}",
                ],
                check=False,
                timeout=300,
            )
        if issuer_runner is not None:
            with contextlib.suppress(Exception):
                await issuer_runner.cleanup()
        with contextlib.suppress(Exception):
            bao.stop()
        for name in dbs:
            with contextlib.suppress(Exception):
                pg.drop_database(name)
        pg.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-unchained"]:  # the launcher of the unchained broker
        serve_unchained(sys.argv[2])
    else:
        asyncio.run(main())
