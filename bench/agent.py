"""The agent's two promises in time, through the broker vs straight from OpenBao, in one run.

1. Start → ready: from starting ``broker agent`` for a new pod (a Kubernetes-shaped
   projected token in its file, the dev issuer as a ``kubernetes`` issuer) until its
   ``GET /ready`` answers 200, i.e. every credential file is written: 1 credential
   (dev-db, ``pgpass``) and 5 (four dev-db in ``json``, ``pgpass``, ``env``, ``template``,
   and a dev-cert in ``pem``). Direct: what a pod does without the broker, with the same
   pod token: ``bao write auth/jwt/login`` (OpenBao's JWT auth, verifying the token
   against the same issuer's keys), then ``bao read database/creds/dev-db`` (and, for 5,
   the five reads at once), each output written to a file (temporary file + rename, mode
   0400). Both clocks include starting the processes.
2. SIGTERM → the PostgreSQL login refused: the agent holding one dev-db login gets
   SIGTERM; the clock runs until a new connection with its login fails (polled every
   5 ms). ``--on-exit release`` gives the lease back (``DELETE /v1/leases/{id}``, which
   revokes it in Vault); ``--on-exit terminate`` ends the pod's instance
   (``POST /v1/instances/self/terminate``): the request writes the revocation job and
   wakes the revocation tick of the replica that took it (at once when idle, right after
   the run in progress otherwise), and that run revokes the pod's leases. Where no replica
   is woken (the job written by another door, or the woken run busy with a long batch)
   the job waits for a tick, so ``revocation.tick_s`` can matter: the figure is measured
   on two brokers, one with the default tick (1 s) and one with 0.2 s. Direct: the
   login's lease revoked with ``PUT sys/leases/revoke`` (``sync``) until the login fails.

Runs are interleaved (one of each kind per round, in a rotating order), so a busy moment
on the shared machine falls on both sides alike; every run is bounded in time, the whole
in rounds (``--runs``, at least 30) and in seconds (``--budget-s``). Brokers run as their
own ``broker serve`` processes (real OpenBao, PostgreSQL store); everything is on
loopback; every lease is revoked and every process stopped at the end, on failure too.

    python bench/agent.py [--runs 30] [--budget-s 900]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.exchange import bench_config, pct, start_broker, wait_ready  # noqa: E402
from broker.dev.issuer import DEV_AUDIENCE, DevIssuer  # noqa: E402
from broker.dev.openbao import OpenBaoDevServer, bao_binary, free_port  # noqa: E402
from broker.leases.migrations import migrate  # noqa: E402
from broker.vault.bootstrap import bootstrap_dev  # noqa: E402
from tests.harness.agent import KUBERNETES_ISSUER, AgentProcess, Pod  # noqa: E402
from tests.harness.postgres import PgServer, find_or_start_postgres  # noqa: E402

DEFAULT_TICK_S = 1.0  # revocation.tick_s when the configuration says nothing
SHORT_TICK_S = 0.2
RUN_TIMEOUT_S = 60.0  # any one wait inside a run
POLL_S = 0.005  # the login and readiness polls
ONE = ["db=dev-db,format=pgpass"]
FIVE = ["db=dev-db,format=json", "pgpass=dev-db,format=pgpass", "env=dev-db,format=env",
        "url=dev-db,format=template", "tls=dev-cert,format=pem"]
TEMPLATE = ["--template", "url=postgresql://${username}@db/orders?password=${password}"]


@dataclass
class Bench:
    work: Path
    pg: PgServer
    bao: OpenBaoDevServer
    issuer: DevIssuer
    http: aiohttp.ClientSession
    brokers: dict[float, str] = field(default_factory=dict)  # tick_s -> broker URL

    def pod(self) -> Pod:
        return Pod(self.issuer, self.work / "pods", namespace="bench", service_account="app")

    async def vault(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        async with self.http.request(method, f"{self.bao.addr}/v1/{path}", json=body,
                                     headers={"X-Vault-Token": self.bao.root_token}) as resp:
            text = await resp.text()
            if resp.status >= 300:
                raise RuntimeError(f"OpenBao {method} {path}: {resp.status} {text[:300]}")
            return json.loads(text) if text else {}

    async def bao_cli(self, *args: str, token: str | None = None) -> dict[str, Any]:
        """The ``bao`` CLI, as a pod's script would run it; its JSON output."""
        env = {"HOME": str(self.work), "BAO_ADDR": self.bao.addr}
        if token:
            env["BAO_TOKEN"] = token
        proc = await asyncio.create_subprocess_exec(
            bao_binary(), *args, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"bao {args[0]} {args[-1].split('=')[0]}: {err.decode()[:300]}")
        return dict(json.loads(out))


# -- the login ---------------------------------------------------------------------------


def login_works(pg: PgServer, user: str, password: str) -> bool:
    try:
        with psycopg.connect(host=pg.host, port=pg.port, dbname="postgres", user=user,
                             password=password, connect_timeout=5):
            return True
    except psycopg.OperationalError:
        return False


def until_refused(pg: PgServer, user: str, password: str, since: float) -> float:
    """Seconds from ``since`` until a new connection with the login fails."""
    while time.monotonic() - since < RUN_TIMEOUT_S:
        if not login_works(pg, user, password):
            return time.monotonic() - since
        time.sleep(POLL_S)
    raise RuntimeError(f"the login was still accepted {RUN_TIMEOUT_S:.0f}s later")


def pgpass(path: Path) -> tuple[str, str]:
    user, password = path.read_text().rstrip("\n").split(":")[3:5]
    return user, password


# -- through the broker ------------------------------------------------------------------


async def until_ready(b: Bench, agent: AgentProcess) -> float:
    """Seconds from the agent's start until ``GET /ready`` answers 200."""
    url = f"http://127.0.0.1:{agent.port}/ready"
    while time.monotonic() - agent.started < RUN_TIMEOUT_S:
        if agent.proc.returncode is not None:
            raise RuntimeError(f"agent exited ({agent.proc.returncode}); see {agent.log}")
        with contextlib.suppress(aiohttp.ClientError):
            async with b.http.get(url) as resp:
                if resp.status == 200:
                    return time.monotonic() - agent.started
        await asyncio.sleep(POLL_S)
    raise RuntimeError(f"agent not ready within {RUN_TIMEOUT_S:.0f}s; see {agent.log}")


async def agent_run(b: Bench, tick_s: float, credentials: list[str], on_exit: str,
                    *, sigterm_to_refused: bool) -> dict[str, float]:
    pod = b.pod()
    extra = TEMPLATE if credentials is FIVE else []
    agent = await AgentProcess.start(pod, b.brokers[tick_s], credentials, *extra,
                                     "--on-exit", on_exit)
    try:
        out = {"ready": await until_ready(b, agent)}
        if sigterm_to_refused:
            user, password = pgpass(pod.directory / "db")
            if not await asyncio.to_thread(login_works, b.pg, user, password):
                raise RuntimeError("the agent's login did not work before SIGTERM")
            sent = time.monotonic()
            agent.proc.send_signal(signal.SIGTERM)
            out["refused"] = await asyncio.to_thread(until_refused, b.pg, user, password, sent)
            # Signalled once: a second SIGTERM could land after its handler is gone.
            code = await asyncio.wait_for(agent.proc.wait(), RUN_TIMEOUT_S)
        else:
            code = await agent.stop(timeout=RUN_TIMEOUT_S)
        if code != 0:
            raise RuntimeError(f"agent exited {code}; see {agent.log}")
        return out
    finally:
        await agent.kill()
        AgentProcess.started.remove(agent)


# -- straight from OpenBao ---------------------------------------------------------------


def write_file(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


async def direct_login(b: Bench, pod: Pod) -> tuple[str, str]:
    """The pod's token exchanged for an OpenBao token (JWT auth): (token, accessor)."""
    login = await b.bao_cli("write", "-format=json", "auth/jwt/login", "role=pod",
                            f"jwt=@{pod.token_file}")
    return login["auth"]["client_token"], login["auth"]["accessor"]


async def direct_cleanup(b: Bench, leases: list[str], accessor: str) -> None:
    for lease in leases:
        await b.vault("PUT", "sys/leases/revoke", {"lease_id": lease, "sync": True})
    await b.vault("POST", "auth/token/revoke-accessor", {"accessor": accessor})


async def direct_ready(b: Bench, count: int) -> dict[str, float]:
    pod = b.pod()
    started = time.monotonic()
    token, accessor = await direct_login(b, pod)
    reads: list[Awaitable[dict[str, Any]]] = [
        b.bao_cli("read", "-format=json", "database/creds/dev-db", token=token)
        for _ in range(count if count == 1 else count - 1)]
    if count > 1:
        reads.append(b.bao_cli("write", "-format=json", "pki/issue/dev-cert",
                               f"common_name={pod.uid}.workload.internal", token=token))
    answers = await asyncio.gather(*reads)
    for k, answer in enumerate(answers):
        data = answer["data"]
        if "certificate" in data:
            write_file(pod.directory / f"c{k}.key", data["private_key"])
            write_file(pod.directory / f"c{k}-ca.crt", "\n".join(data["ca_chain"]))
            write_file(pod.directory / f"c{k}.crt", data["certificate"])
        else:
            write_file(pod.directory / f"c{k}", json.dumps(data))
    ready = time.monotonic() - started
    await direct_cleanup(b, [a["lease_id"] for a in answers], accessor)
    return {"ready": ready}


async def direct_revoke(b: Bench) -> dict[str, float]:
    pod = b.pod()
    token, accessor = await direct_login(b, pod)
    cred = await b.bao_cli("read", "-format=json", "database/creds/dev-db", token=token)
    user, password = cred["data"]["username"], cred["data"]["password"]
    if not await asyncio.to_thread(login_works, b.pg, user, password):
        raise RuntimeError("the direct login did not work before the revoke")
    sent = time.monotonic()
    await b.vault("PUT", "sys/leases/revoke", {"lease_id": cred["lease_id"], "sync": True})
    refused = await asyncio.to_thread(until_refused, b.pg, user, password, sent)
    await direct_cleanup(b, [], accessor)
    return {"refused": refused}


# -- set-up ------------------------------------------------------------------------------


async def configure_jwt_auth(b: Bench) -> None:
    """OpenBao's JWT auth trusting the dev issuer's keys, with the audience the broker
    expects: a pod can log in to OpenBao with the very token it gives the broker."""
    await b.vault("POST", "sys/auth/jwt", {"type": "jwt"})
    await b.vault("POST", "auth/jwt/config",
                  {"jwks_url": f"{b.issuer.issuer}/.well-known/jwks.json",
                   "bound_issuer": b.issuer.issuer})
    await b.vault("POST", "auth/jwt/role/pod",
                  {"role_type": "jwt", "user_claim": "sub", "bound_audiences": [DEV_AUDIENCE],
                   "token_policies": ["broker-instance"], "token_no_default_policy": True,
                   "token_ttl": "1h"})


def broker_config(b: Bench, setup: Any, store_url: str, port: int,
                  tick_s: float) -> dict[str, Any]:
    cfg = bench_config(b.bao, setup, b.issuer, store_url, port)
    cfg["identity"]["issuers"][0].update(KUBERNETES_ISSUER)
    # A Kubernetes workload is namespace/serviceaccount, which is no DNS label: the
    # certificate names the pod (its uid) instead.
    cfg["roles"]["dev-cert"]["params"] = {"common_name": "{instance_id}.workload.internal"}
    cfg["policy"] = {"rules": [{"name": "pods", "issuer": "dev",
                                "match": [{"identity": "workload",
                                           "regex": "[a-z0-9-]{1,63}/[a-z0-9-]{1,63}"}],
                                "allow": sorted(cfg["roles"])}]}
    if tick_s != DEFAULT_TICK_S:
        cfg["revocation"] = {"tick_s": tick_s}
    else:
        cfg.pop("revocation", None)  # the broker's own default
    return cfg


# -- the runs ----------------------------------------------------------------------------

Kind = Callable[[Bench], Awaitable[dict[str, float]]]


def kinds() -> dict[str, Kind]:
    return {
        "agent-1-terminate-default": lambda b: agent_run(
            b, DEFAULT_TICK_S, ONE, "terminate", sigterm_to_refused=True),
        "agent-1-terminate-short": lambda b: agent_run(
            b, SHORT_TICK_S, ONE, "terminate", sigterm_to_refused=True),
        "agent-1-release": lambda b: agent_run(
            b, DEFAULT_TICK_S, ONE, "release", sigterm_to_refused=True),
        "agent-5": lambda b: agent_run(b, DEFAULT_TICK_S, FIVE, "release",
                                       sigterm_to_refused=False),
        "direct-1": lambda b: direct_ready(b, 1),
        "direct-5": lambda b: direct_ready(b, 5),
        "direct-revoke": direct_revoke,
    }


async def measure(b: Bench, runs: int, budget_s: float) -> tuple[dict[str, list[dict]], int]:
    todo = kinds()
    names = list(todo)
    for name in names:  # warm-up: connections, the issuer's keys, the page cache
        await todo[name](b)
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    started = time.monotonic()
    done = 0
    for r in range(runs):
        if time.monotonic() - started > budget_s:
            break
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(await todo[name](b))
        done += 1
    return results, done


def figures(samples: list[float]) -> tuple[float, float]:
    return pct(samples, 50), pct(samples, 99)


def report(results: dict[str, list[dict[str, float]]], rounds: int) -> list[dict[str, Any]]:
    def pick(name: str, key: str) -> list[float]:
        return [s[key] for s in results[name]]

    ready_1 = pick("agent-1-terminate-default", "ready") + pick("agent-1-release", "ready")
    revoke = pick("direct-revoke", "refused")
    rows = [
        ("start -> ready, 1 credential (dev-db)", ready_1, pick("direct-1", "ready"),
         "JWT login + read + write"),
        ("start -> ready, 5 credentials", pick("agent-5", "ready"), pick("direct-5", "ready"),
         "JWT login + 5 reads + write"),
        ("SIGTERM -> login refused, release", pick("agent-1-release", "refused"), revoke,
         "lease revoke (sync)"),
        (f"SIGTERM -> login refused, terminate, tick {DEFAULT_TICK_S:g} s (default)",
         pick("agent-1-terminate-default", "refused"), revoke, "lease revoke (sync)"),
        (f"SIGTERM -> login refused, terminate, tick {SHORT_TICK_S:g} s",
         pick("agent-1-terminate-short", "refused"), revoke, "lease revoke (sync)"),
    ]
    print(f"\n{rounds} rounds, {os.cpu_count()} cores shared, OpenBao dev (inmem), "
          f"PostgreSQL store; Kubernetes-shaped pod tokens; revocation.tick_s "
          f"{DEFAULT_TICK_S:g} s (default) and {SHORT_TICK_S:g} s")
    print(f"{'':56} | {'broker agent':^17} | {'direct OpenBao':^17} |")
    print(f"{'seconds':56} | {'n':>3} {'p50':>6} {'p99':>6} | {'n':>3} {'p50':>6} {'p99':>6} | "
          f"{'x p50':>6}  direct is")
    out = []
    for label, agent, direct, how in rows:
        a50, a99 = figures(agent)
        d50, d99 = figures(direct)
        print(f"{label:56} | {len(agent):>3} {a50:6.3f} {a99:6.3f} | {len(direct):>3} "
              f"{d50:6.3f} {d99:6.3f} | {a50 / d50:6.2f}  {how}")
        out.append({"measure": label, "agent": {"n": len(agent), "p50": a50, "p99": a99},
                    "direct": {"n": len(direct), "p50": d50, "p99": d99, "is": how},
                    "ratio_p50": a50 / d50})
    print("x p50 = agent p50 / direct p50 (1.0 = as fast as going to OpenBao directly); "
          "p99 of about 30 runs is the slowest run or next to it")
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30, help="rounds (one run of each kind)")
    ap.add_argument("--budget-s", type=float, default=900.0,
                    help="no new round starts after this many seconds of measuring")
    args = ap.parse_args()
    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")

    work = Path(tempfile.mkdtemp(prefix="broker-bench-agent-"))
    os.chmod(work, 0o755)
    pg = find_or_start_postgres(work)
    bao = OpenBaoDevServer(work / "openbao")
    bao.start()
    procs: list[subprocess.Popen[bytes]] = []
    databases: list[str] = []
    runner = None
    try:
        setup = bootstrap_dev(bao.addr, bao.root_token, postgres_url=pg.admin_url)
        if not setup.database_configured:
            raise SystemExit("OpenBao could not reach PostgreSQL: no dev-db role")
        iport = free_port()
        issuer = DevIssuer.generate(f"http://127.0.0.1:{iport}")
        runner = web.AppRunner(issuer.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", iport).start()
        async with aiohttp.ClientSession() as http:
            b = Bench(work, pg, bao, issuer, http)
            await configure_jwt_auth(b)
            for tick_s in (DEFAULT_TICK_S, SHORT_TICK_S):
                name = pg.create_database("broker_bench_agent")
                databases.append(name)
                migrate(pg.url(name))
                port = free_port()
                home = work / f"broker-tick-{tick_s:g}"
                home.mkdir()
                procs.append(start_broker(
                    broker_config(b, setup, pg.url(name), port, tick_s), home))
                await wait_ready(http, f"http://127.0.0.1:{port}", home)
                b.brokers[tick_s] = f"http://127.0.0.1:{port}"
            results, rounds = await measure(b, args.runs, args.budget_s)
        rows = report(results, rounds)
        if rounds < args.runs:
            print(f"stopped after {rounds} of {args.runs} rounds: --budget-s {args.budget_s:g}")
        out = ROOT / ".bench"
        out.mkdir(exist_ok=True)
        (out / "agent.json").write_text(json.dumps(
            {"rounds": rounds, "tick_s": [DEFAULT_TICK_S, SHORT_TICK_S], "rows": rows,
             "samples": results}, indent=2))
    finally:
        # Each step on its own: one that fails must not leave the others undone.
        with contextlib.suppress(Exception):
            await AgentProcess.kill_all()
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.terminate()
                proc.wait(timeout=20)
        for prefix in ("database/creds/dev-db", "pki/issue/dev-cert"):
            with contextlib.suppress(Exception):
                subprocess.run(
                    ["curl", "-s", "-o", "/dev/null", "-X", "PUT", "-H",
                     f"X-Vault-Token: {bao.root_token}", "-d", '{"sync": true}',
                     f"{bao.addr}/v1/sys/leases/revoke-prefix/{prefix}"],
                    check=False, timeout=300)
        if runner is not None:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        with contextlib.suppress(Exception):
            bao.stop()
        for name in databases:
            with contextlib.suppress(Exception):
                pg.drop_database(name)
        pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
