"""Issuance per engine, through the broker and straight from OpenBao, in the same run.

For every engine that runs here (pki issue and sign, ssh, database on PostgreSQL, MariaDB
and Redis, rabbitmq, kv) this sets up a Vault mount the way its integration test does,
starts one `broker serve` process (PostgreSQL store) with a role per engine, and issues
N credentials at concurrency C both ways:
- direct: a token per instance from the same token role and policies the broker uses, and
  the very Vault request the engine builds (same path, same body);
- broker: a dev-issuer JWT per instance sent to `POST /v1/credentials`.
It prints throughput, p50 and the cost ratio (direct/s ÷ broker/s) per engine. Everything
is on loopback; each phase is bounded in count and time; every mount, lease and login is
removed at the end. An engine whose service is missing is reported and skipped.

    python bench/engines.py [--n 200] [--n-slow 80] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import exchange  # noqa: E402
from bench.exchange import bench_config, run_phase, start_broker, wait_ready  # noqa: E402
from broker.config import load_settings  # noqa: E402
from broker.dev.issuer import DevIssuer  # noqa: E402
from broker.dev.openbao import OpenBaoDevServer, free_port  # noqa: E402
from broker.engines import ENGINES, read_caller_params  # noqa: E402
from broker.identity.model import Identity  # noqa: E402
from broker.leases.migrations import migrate  # noqa: E402
from broker.policy import render_params  # noqa: E402
from broker.vault.bootstrap import bootstrap_dev  # noqa: E402
from tests.harness import databases, pki, rabbitmq  # noqa: E402
from tests.harness.postgres import find_or_start_postgres  # noqa: E402
from tests.harness.vault import VaultProbe  # noqa: E402

PER_INSTANCE = 10
WORKLOAD = "payments"


@dataclass
class Case:
    name: str
    role: dict[str, Any]
    policy: str
    slow: bool = False  # creates a login on a server: fewer requests
    caller: Callable[[], dict[str, Any]] = field(default=lambda: {})


def _kv_mount(vault: VaultProbe, stack: contextlib.ExitStack) -> Case:
    mount, policy = (
        f"kv-bench-{secrets.token_hex(3)}",
        f"broker-instance-kvb-{secrets.token_hex(3)}",
    )
    vault.call("POST", f"sys/mounts/{mount}", {"type": "kv", "options": {"version": "2"}})
    stack.callback(vault.call, "DELETE", f"sys/mounts/{mount}")
    vault.call("POST", f"{mount}/data/apps/{WORKLOAD}/config", {"data": {"api_key": "x" * 32}})
    rules = f'path "{mount}/data/apps/+/config" {{ capabilities = ["read"] }}'
    vault.call("PUT", f"sys/policies/acl/{policy}", {"policy": rules})
    stack.callback(vault.call, "DELETE", f"sys/policies/acl/{policy}")
    return Case(
        "kv",
        {
            "engine": "kv",
            "mount": mount,
            "vault_role": "static",
            "params": {"path": "apps/{workload}/config"},
        },
        policy,
    )


def setup_cases(
    vault: VaultProbe, pg: Any, stack: contextlib.ExitStack, work: Path
) -> tuple[list[Case], list[str]]:
    cases: list[Case] = []
    missing: list[str] = []
    names = {"common_name": f"{WORKLOAD}.svc.internal"}
    mount = stack.enter_context(pki.mounted_pki(vault, {"bench": pki.pki_role()}))
    cert = {"engine": "pki", "mount": mount.path, "vault_role": "bench", "params": names}
    csr, _ = pki.openssl_csr(work, cn=names["common_name"])
    cases.append(Case("pki issue", {**cert, "mode": "issue"}, mount.policy))
    cases.append(
        Case("pki sign", {**cert, "mode": "sign"}, mount.policy, caller=lambda: {"csr": csr})
    )
    ssh_mount = stack.enter_context(
        pki.mounted_ssh_ca(
            vault,
            {
                "bench": {
                    "key_type": "ca",
                    "allow_user_certificates": True,
                    "allow_user_key_ids": True,
                    "allowed_users": WORKLOAD,
                    "default_extensions": {"permit-pty": ""},
                    "allowed_extensions": "permit-pty",
                    "ttl": "10m",
                    "max_ttl": "1h",
                }
            },
        )
    )
    pub = (pki.ssh_keypair(work).with_suffix(".pub")).read_text().strip()
    cases.append(
        Case(
            "ssh sign",
            {
                "engine": "ssh",
                "mount": ssh_mount.path,
                "vault_role": "bench",
                "params": {
                    "valid_principals": "{workload}",
                    "key_id": "{issuer_name}:{instance_id}",
                },
            },
            ssh_mount.policy,
            caller=lambda: {"public_key": pub},
        )
    )
    cases.append(_kv_mount(vault, stack))
    for label, enter in (
        ("database postgres", lambda: databases.postgres_target(vault, pg)),
        ("database mariadb", lambda: databases.mariadb_target(vault)),
        ("database redis", lambda: databases.redis_target(vault, "redis-database-plugin")),
        ("rabbitmq", lambda: rabbitmq.mounted_rabbitmq(vault)),
    ):
        try:
            target = stack.enter_context(enter())
        except BaseException as exc:  # noqa: BLE001 — pytest's skip is a BaseException
            missing.append(f"{label}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        side = getattr(target, "side", target)
        cases.append(Case(label, side.broker_role(), side.policy, slow=True))
    return cases, missing


class Direct(exchange.Direct):
    """The same Vault call the engine builds, with a token per instance."""

    async def issue(self, settings_role: Any, caller: dict[str, Any], i: int) -> None:
        instance = f"d-{self.tag}-{i // PER_INSTANCE}"
        now = datetime.now(UTC)
        ident = Identity(
            "dev", "bench", instance, instance, WORKLOAD, now, now + timedelta(hours=1), {}
        )
        engine = ENGINES[settings_role.engine]
        caller = read_caller_params(engine, "bench", settings_role, caller)
        req = engine.request(settings_role, render_params(settings_role.params, ident), caller, 600)
        tok = await self.token(instance)
        async with self.http.request(
            req.method,
            f"{self.addr}/v1/{req.path}",
            headers={"X-Vault-Token": tok},
            json=req.body if req.method != "GET" else None,
        ) as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()


async def measure(
    case: Case,
    args: argparse.Namespace,
    http: aiohttp.ClientSession,
    bao: OpenBaoDevServer,
    url: str,
    issuer: DevIssuer,
    policies: list[str],
    settings: Any,
) -> dict[str, Any]:
    role = _role_name(case)
    s_role = settings.roles[role]
    n = args.n_slow if case.slow else args.n
    conc = args.concurrency
    caller = case.caller()
    tag = f"{role}-{secrets.token_hex(3)}"
    direct = Direct(http, bao.addr, bao.root_token, tag, tuple(policies))
    via = exchange.ViaBroker(http, url, issuer, tag, n)
    warm_d = Direct(http, bao.addr, bao.root_token, "w" + tag, tuple(policies))
    warm_b = exchange.ViaBroker(http, url, issuer, "w" + tag, 20)
    await run_phase(20, conc, lambda i: warm_d.issue(s_role, caller, i))
    await run_phase(20, conc, lambda i: warm_b.issue(role, i, caller))
    d = await run_phase(n, conc, lambda i: direct.issue(s_role, caller, i))
    b = await run_phase(n, conc, lambda i: via.issue(role, i, caller))
    return {
        "engine": case.name,
        "n": n,
        "concurrency": conc,
        "direct": d,
        "broker": b,
        "ratio": d["throughput"] / b["throughput"],
    }


def _role_name(case: Case) -> str:
    return case.name.replace(" ", "-")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="requests per engine and path")
    ap.add_argument("--n-slow", type=int, default=80, help="for engines that create logins")
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="broker-bench-engines-"))
    os.chmod(work, 0o755)
    pg = find_or_start_postgres(work)
    bao = OpenBaoDevServer(work / "openbao")
    bao.start()
    vault = VaultProbe(bao.addr, bao.root_token, timeout=300)
    proc = None
    db_name = None
    issuer_runner = None
    try:
        with contextlib.ExitStack() as stack:
            try:
                setup = bootstrap_dev(bao.addr, bao.root_token, postgres_url=pg.admin_url)
                cases, missing = setup_cases(vault, pg, stack, work)
                iport = free_port()
                issuer = DevIssuer.generate(f"http://127.0.0.1:{iport}")
                issuer_runner = web.AppRunner(issuer.app(), access_log=None)
                await issuer_runner.setup()
                await web.TCPSite(issuer_runner, "127.0.0.1", iport).start()

                db_name = pg.create_database("broker_bench_engines")
                store_url = pg.url(db_name)
                migrate(store_url)
                port = free_port()
                cfg = bench_config(bao, setup, issuer, store_url, port)
                for case in cases:
                    cfg["roles"][_role_name(case)] = {
                        "default_ttl": "10m",
                        "max_ttl": "1h",
                        **case.role,
                        "max_leases_per_instance": PER_INSTANCE,
                    }
                cfg["policy"]["rules"][0]["allow"] = sorted(cfg["roles"])
                policies = ["broker-instance", *sorted({c.policy for c in cases})]
                cfg["vault"]["instance_policies"] = policies
                settings = load_settings(cfg, source="bench")
                proc = start_broker(cfg, work)
                url = f"http://127.0.0.1:{port}"
                rows = []
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
                    await wait_ready(http, url, work)
                    conc = args.concurrency
                    for case in cases:
                        rows.append(
                            await measure(case, args, http, bao, url, issuer, policies, settings)
                        )
                        r = rows[-1]
                        print(
                            f"  {case.name:18} direct {r['direct']['throughput']:7.0f}/s  "
                            f"broker {r['broker']['throughput']:7.0f}/s  cost x {r['ratio']:.2f}",
                            flush=True,
                        )
                print(
                    f"\nengines through the broker vs OpenBao direct; concurrency {conc}, "
                    f"{PER_INSTANCE} credentials per instance, {os.cpu_count()} cores, "
                    "PostgreSQL store, OpenBao dev (inmem)"
                )
                print(
                    f"{'engine':18} {'n':>4} | {'direct/s':>9} {'p50ms':>7} | "
                    f"{'broker/s':>9} {'p50ms':>7} | {'cost x':>6}"
                )
                for r in rows:
                    d, b = r["direct"], r["broker"]
                    print(
                        f"{r['engine']:18} {r['n']:>4} | {d['throughput']:9.0f} "
                        f"{d['p50_ms']:7.1f} | {b['throughput']:9.0f} {b['p50_ms']:7.1f} | "
                        f"{r['ratio']:6.2f}"
                    )
                for line in missing:
                    print(f"not measured: {line}")
                print("cost x = direct throughput / broker throughput (1.0 = free)")
                out = ROOT / ".bench"
                out.mkdir(exist_ok=True)
                (out / "engines.json").write_text(json.dumps(rows, indent=2))
            finally:
                if proc is not None:
                    proc.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(10)
                    if proc.poll() is None:
                        proc.kill()
                if issuer_runner is not None:
                    with contextlib.suppress(Exception):
                        await issuer_runner.cleanup()
                # The stack (mounts, logins, policies) unwinds here, while OpenBao still runs.
    finally:
        # After the stack: mounts, logins and policies go first, while OpenBao still runs.
        with contextlib.suppress(Exception):
            bao.stop()
        if db_name is not None:
            with contextlib.suppress(Exception):
                pg.drop_database(db_name)
        with contextlib.suppress(Exception):
            pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
