"""Bulk revocation at scale: a selection's dry run, its bulk termination, and what
revoking its leases costs next to OpenBao revoking them itself, in the same run.

1. Real leases: I instances (default 250) of workload ``hot`` × L dev-cert leases (default
   2: 500 leases) through ``POST /v1/credentials``. The clock runs from the first
   ``POST /v1/admin/terminations`` (selection: workload hot, batch 200, the cursor followed
   to its end) until every job is ``done`` in the store (polled there, as
   bench/revocation.py does) and OpenBao lists none of the leases: leases/s.
   Direct: the same number of dev-cert leases read with one instance token, then each
   revoked with ``PUT sys/leases/revoke`` (``sync``) at concurrency 16 until OpenBao lists
   none: leases/s. The ratio is broker ÷ direct.
2. A seeded fleet: N instances (default 10,000) of workload ``seeded``, each with one
   active lease row, written straight into the store (10,000 exchanges would measure
   issuance, not this). Then the dry run (``POST /v1/admin/selection``) is timed, and the
   bulk termination (batch 500, the cursor followed to its end) until every instance has
   its job recorded. (Their lease rows name no real Vault lease: the worker that starts on
   them meanwhile is part of the load, as it would be in an incident.)

Everything is on loopback; every phase is bounded in count and time; the store database
is dropped and the processes stopped at the end, on failure too.

    python bench/bulk.py [--instances 250] [--leases-per-instance 2] [--seeded 10000]
                         [--worker-batch 8]

The revocation worker runs ``revocation.batch`` jobs at once (default 8), each revoking its
instance's leases, token and confirmations one after another: that, not the bulk
termination, bounds the broker's leases/s here (``--worker-batch 64`` shows how much).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench.revocation  # noqa: E402
from bench.exchange import run_phase  # noqa: E402
from bench.revocation import PREFIX, WAIT_TIMEOUT_S, Env, StoreProbe, VaultDirect  # noqa: E402

CONCURRENCY = 16
REAL_BATCH = 200
SEEDED_BATCH = 500
MAX_BATCHES = 1000
POLL_S = 0.1


async def admin_post(
    http: aiohttp.ClientSession, url: str, token: str, path: str, body: dict[str, Any]
) -> dict[str, Any]:
    async with http.post(
        f"{url}{path}", json=body, headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        answer: dict[str, Any] = await resp.json()
        assert resp.status in (200, 202), answer
        return answer


async def terminate_all(
    http: aiohttp.ClientSession, url: str, token: str, workload: str, batch: int
) -> int:
    """Follow the bulk termination's cursor to its end; how many jobs it recorded."""
    body = {
        "selection": {"workloads": [workload]},
        "reason": "bench",
        "incident": "BENCH-1",
        "batch": batch,
    }
    after, recorded = None, 0
    for _ in range(MAX_BATCHES):
        answer = await admin_post(
            http, url, token, "/v1/admin/terminations", {**body, "after": after}
        )
        recorded += len(answer["terminated"])
        after = answer["next"]
        if after is None:
            return recorded
    raise RuntimeError(f"more than {MAX_BATCHES} batches")


async def wait_jobs_done(store: StoreProbe, prefix: str, count: int) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while True:
        rows = await store.aquery(
            "SELECT state, count(*) FROM revocation_jobs WHERE instance_id LIKE %s GROUP BY state",
            (prefix + "%",),
        )
        states = dict(rows)
        if states.get("failed"):
            raise RuntimeError(f"revocation jobs failed: {states}")
        if states.get("done", 0) >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs not done after {WAIT_TIMEOUT_S}s: {states}")
        await asyncio.sleep(POLL_S)


async def real_leases(
    env: Env, http: aiohttp.ClientSession, url: str, store: StoreProbe, instances: int, per: int
) -> dict[str, Any]:
    assert env.issuer is not None
    tokens = [
        env.issuer.mint(instance=f"hot-{k:05d}", workload="hot", ttl=600) for k in range(instances)
    ]

    async def issue(i: int) -> None:
        async with http.post(
            f"{url}/v1/credentials",
            json={"role": "dev-cert", "ttl": "10m"},
            headers={"Authorization": f"Bearer {tokens[i // per]}"},
        ) as resp:
            assert resp.status == 201, await resp.text()
            await resp.read()

    issued = await run_phase(instances * per, CONCURRENCY, issue)
    leases = {
        r[0]
        for r in await store.aquery(
            "SELECT vault_lease_id FROM leases WHERE workload = 'hot' AND state = 'active'"
        )
    }
    assert len(leases) == instances * per, len(leases)
    vault = VaultDirect(http, env.bao.addr, env.setup.broker_token)  # type: ignore[union-attr]
    t0 = time.perf_counter()
    recorded = await terminate_all(http, url, env.admin_token, "hot", REAL_BATCH)
    recorded_s = time.perf_counter() - t0
    assert recorded == instances, recorded
    await wait_jobs_done(store, "hot-", instances)
    await vault.wait_gone(PREFIX["dev-cert"], leases, WAIT_TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    return {
        "issue_per_s": issued["throughput"],
        "recorded_s": recorded_s,
        "revoke_s": elapsed,
        "leases_per_s": len(leases) / elapsed,
    }


async def direct(env: Env, http: aiohttp.ClientSession, n: int) -> dict[str, Any]:
    assert env.bao is not None
    vault = VaultDirect(http, env.bao.addr, env.setup.broker_token)
    token, _ = await vault.instance_token("direct-bulk")
    leases: list[str] = [""] * n

    async def issue(i: int) -> None:
        leases[i] = await vault.issue(token, "dev-cert")

    async def revoke(i: int) -> None:
        async with http.put(
            f"{env.bao.addr}/v1/sys/leases/revoke",  # type: ignore[union-attr]
            headers={"X-Vault-Token": env.setup.broker_token},
            json={"lease_id": leases[i], "sync": True},
        ) as resp:
            assert resp.status in (200, 204), await resp.text()

    await run_phase(n, CONCURRENCY, issue)
    t0 = time.perf_counter()
    await run_phase(n, CONCURRENCY, revoke)
    await vault.wait_gone(PREFIX["dev-cert"], set(leases), WAIT_TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    return {"revoke_s": elapsed, "leases_per_s": n / elapsed}


async def seeded(
    http: aiohttp.ClientSession, url: str, token: str, store: StoreProbe, n: int
) -> dict[str, Any]:
    kind = (await store.aquery("SELECT kind FROM leases WHERE role = 'dev-cert' LIMIT 1"))[0][0]
    await store.aquery(
        "INSERT INTO instances (instance_id, issuer_name, workload, state, created_at, "
        "updated_at, last_seen_at, claims) SELECT 'seed-' || lpad(g::text, 6, '0'), 'dev', "
        "'seeded', 'active', now(), now(), now(), '{\"team\": \"red\"}'::json "
        "FROM generate_series(1, %s) g RETURNING 1",
        (n,),
    )
    await store.aquery(
        "INSERT INTO leases (lease_id, instance_id, workload, role, kind, state, renewable, "
        "created_at, updated_at, issued_at, expires_at, vault_lease_id) "
        "SELECT 'l-' || md5('seed' || g), 'seed-' || lpad(g::text, 6, '0'), 'seeded', "
        "'dev-cert', %s, 'active', false, now(), now(), now(), now() + interval '1 hour', "
        "'pki/issue/dev-cert/seed-' || g FROM generate_series(1, %s) g RETURNING 1",
        (kind, n),
    )
    t0 = time.perf_counter()
    radius = await admin_post(
        http, url, token, "/v1/admin/selection", {"selection": {"workloads": ["seeded"]}}
    )
    dry_run_s = time.perf_counter() - t0
    assert radius["instances"] == n and radius["leases"]["live"] == n, radius
    t0 = time.perf_counter()
    recorded = await terminate_all(http, url, token, "seeded", SEEDED_BATCH)
    record_s = time.perf_counter() - t0
    jobs = (
        await store.aquery("SELECT count(*) FROM revocation_jobs WHERE instance_id LIKE 'seed-%%'")
    )[0][0]
    assert recorded == n == jobs, (recorded, jobs)
    return {"dry_run_s": dry_run_s, "record_s": record_s, "instances_per_s": n / record_s}


def with_worker_batch(batch: int) -> None:
    """The brokers ``Env`` starts run ``revocation.batch`` jobs at once (default 8)."""
    base = bench.revocation.bench_config

    def config(*args: Any, **kwargs: Any) -> dict[str, Any]:
        cfg = base(*args, **kwargs)
        cfg.setdefault("revocation", {})["batch"] = batch
        return cfg

    bench.revocation.bench_config = config  # type: ignore[assignment]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=250)
    ap.add_argument("--leases-per-instance", type=int, default=2)
    ap.add_argument("--seeded", type=int, default=10_000)
    ap.add_argument("--worker-batch", type=int, default=8, help="revocation.batch (1..256)")
    args = ap.parse_args()
    if not 1 <= args.worker_batch <= 256:
        raise SystemExit("--worker-batch 1..256")
    with_worker_batch(args.worker_batch)
    if not (1 <= args.instances <= 5000 and 1 <= args.leases_per_instance <= 10):
        raise SystemExit("--instances 1..5000, --leases-per-instance 1..10")
    if not 1 <= args.seeded <= 100_000:
        raise SystemExit("--seeded 1..100000")
    env = Env(Path(tempfile.mkdtemp(prefix="broker-bench-bulk-")))
    try:
        await env.start()
        timeout = aiohttp.ClientTimeout(total=WAIT_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            store_url = env.store("bulk")
            store = env.probe(store_url)
            (broker,) = await env.brokers(http, store_url, 1, args.leases_per_instance)
            n = args.instances * args.leases_per_instance
            real = await real_leases(
                env, http, broker.url, store, args.instances, args.leases_per_instance
            )
            straight = await direct(env, http, n)
            fleet = await seeded(http, broker.url, env.admin_token, store, args.seeded)
    finally:
        await env.close()
    print(
        f"bulk revocation, {args.instances} instances x {args.leases_per_instance} dev-cert "
        f"leases ({n}), one broker on PostgreSQL (revocation.batch {args.worker_batch}), "
        "OpenBao dev"
    )
    print(
        f"  broker   all jobs recorded {real['recorded_s']:.2f}s; every lease revoked and "
        f"confirmed gone {real['revoke_s']:.2f}s = {real['leases_per_s']:.0f} leases/s"
    )
    print(
        f"  direct   sys/leases/revoke each (sync, c={CONCURRENCY}) "
        f"{straight['revoke_s']:.2f}s = {straight['leases_per_s']:.0f} leases/s"
    )
    print(f"  ratio    broker / direct time = {real['revoke_s'] / straight['revoke_s']:.2f}")
    print(f"seeded fleet, {args.seeded} instances with a lease row each")
    print(f"  dry run  {fleet['dry_run_s'] * 1000:.0f} ms")
    print(
        f"  all jobs recorded {fleet['record_s']:.2f}s "
        f"({fleet['instances_per_s']:.0f} instances/s, batches of {SEEDED_BATCH})"
    )


if __name__ == "__main__":
    asyncio.run(main())
