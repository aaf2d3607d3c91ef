"""The operator's listings on a store the size of an incident (PostgreSQL).

Fills a fresh store with I instances (default 10,000) holding L leases each (default 10,
so 100,000 leases over 8 roles, 4 engines, 50 workloads and 2 issuers; ``--live`` of
them live, default 0.9, the rest ended: a store that keeps history holds far fewer live
leases than ended ones, which is when the state index pays), and a revocation job for
every fifth instance; then times, median of R runs (default 5), through the ledgers the
API uses:

- ``leases count`` by role, engine, workload and issuer (live leases, the default);
- the first and a deep page (cursor past half the rows) of ``instances list`` (1,000 per
  page, lease counts included) and of ``jobs list``;
- ``instance_standing`` (what ``policy explain`` adds to an explain).

It also prints PostgreSQL's plan of the count by role. Everything is on loopback, each
phase bounded in count; the database is dropped at the end, on failure too.

    python bench/listings.py [--instances 10000] [--leases-per-instance 10] [--runs 5]
                             [--live 0.9]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broker.clock import SystemClock  # noqa: E402
from broker.leases import LIVE_LEASE_STATES, Database, Ledgers  # noqa: E402
from broker.leases.migrations import migrate  # noqa: E402
from broker.leases.settings import StoreSettings  # noqa: E402
from tests.harness.postgres import find_or_start_postgres  # noqa: E402

T0 = datetime(2026, 12, 1, tzinfo=UTC)
KINDS = ["x509_certificate", "database_login", "rabbitmq_login", "ssh_certificate"]
LIVE = sorted(s.value for s in LIVE_LEASE_STATES)


def fill(url: str, instances: int, per: int, live: float) -> None:
    with psycopg.connect(url, autocommit=False) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY instances (instance_id, issuer_name, workload, state, created_at, updated_at)"
            " FROM STDIN"
        ) as copy:
            for i in range(instances):
                at = T0 + timedelta(seconds=i // 10)  # ten share each second: ties
                state = "terminating" if i % 5 == 0 else "active"
                copy.write_row((f"i-{i:06d}", f"iss-{i % 2}", f"wl-{i % 50}", state, at, at))
        with cur.copy(
            "COPY leases (lease_id, instance_id, workload, role, kind, state, renewable,"
            " created_at, updated_at) FROM STDIN"
        ) as copy:
            for i in range(instances):
                for n in range(per):
                    at = T0 + timedelta(seconds=i // 10)
                    state = "active" if (i * per + n) % 100 < live * 100 else "revoked"
                    copy.write_row((f"l-{i:06d}{n:026x}", f"i-{i:06d}", f"wl-{i % 50}",
                                    f"role-{(i + n) % 8}", KINDS[n % 4], state, True, at, at))
        with cur.copy(
            "COPY revocation_jobs (job_id, instance_id, state, attempts, next_attempt_at,"
            " requested_by, created_at, updated_at) FROM STDIN"
        ) as copy:
            for i in range(0, instances, 5):
                at = T0 + timedelta(seconds=i // 10)
                copy.write_row((f"j-{i:032x}", f"i-{i:06d}", "pending", 0, at, "operator:b",
                                at, at))
        conn.commit()
        cur.execute("ANALYZE")


async def timed(runs: int, fn) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = await fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, result


async def measure(url: str, instances: int, runs: int) -> None:
    db = Database(StoreSettings(url=url))
    await db.start()
    try:
        admin = Ledgers.on(db, SystemClock()).admin
        for group in ("role", "engine", "workload", "issuer"):
            ms, groups = await timed(runs, lambda g=group: admin.count_leases(
                group_by=g, states=LIVE, top=20))
            print(f"leases count --group-by {group:<8} {ms:7.1f} ms  "
                  f"({groups.total} live leases in {groups.group_count} groups)")
        ms, page = await timed(runs, lambda: admin.list_instances(limit=1000))
        print(f"instances list, first page of 1000  {ms:7.1f} ms")
        mid = page[-1].instance
        deep = (T0 + timedelta(seconds=instances // 20), f"i-{instances // 2:06d}")
        ms, page = await timed(runs, lambda: admin.list_instances(limit=1000, after=deep))
        first = page[0].instance.instance_id
        print(f"instances list, page past half      {ms:7.1f} ms  (first {first})")
        ms, _ = await timed(runs, lambda: admin.list_instances(
            workload="wl-7", limit=1000, after=(mid.created_at, mid.instance_id)))
        print(f"instances list --workload, page 2   {ms:7.1f} ms")
        ms, jobs = await timed(runs, lambda: admin.list_jobs(limit=1000))
        print(f"jobs list, first page of 1000       {ms:7.1f} ms")
        ms, _ = await timed(runs, lambda: admin.list_jobs(limit=1000, after=deep))
        print(f"jobs list, page past half           {ms:7.1f} ms")
        ms, _ = await timed(runs, lambda: admin.instance_standing(f"i-{instances - 5:06d}"))
        print(f"instance standing (explain)         {ms:7.1f} ms")
    finally:
        await db.close()
    with psycopg.connect(url) as conn:
        plan = conn.execute(
            "EXPLAIN SELECT role, count(*), sum(count(*)) OVER (), count(*) OVER () "
            "FROM leases WHERE state IN ('active','issuing','revoking') GROUP BY role "
            "ORDER BY count(*) DESC, role LIMIT 20"
        ).fetchall()
        print("plan of the count by role:\n  " + "\n  ".join(r[0] for r in plan))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=10_000)
    p.add_argument("--leases-per-instance", type=int, default=10)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--live", type=float, default=0.9, help="the fraction of leases live")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        pg = find_or_start_postgres(Path(work))
        name = pg.create_database("bench_listings")
        try:
            url = pg.url(name)
            migrate(url)
            start = time.perf_counter()
            fill(url, args.instances, args.leases_per_instance, args.live)
            print(f"filled {args.instances} instances, "
                  f"{args.instances * args.leases_per_instance} leases in "
                  f"{time.perf_counter() - start:.1f}s")
            asyncio.run(measure(url, args.instances, args.runs))
        finally:
            pg.drop_database(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
