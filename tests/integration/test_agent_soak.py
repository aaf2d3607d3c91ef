"""A bounded soak: fifty ``broker agent`` processes, one per pod, on one broker, with
credentials short enough that every agent renews and re-issues many times; then SIGTERM
to all of them at once.

Each pod holds two credentials: a PostgreSQL login (a 6 s lease, renewable up to its
18 s max TTL, so it is renewed and then issued afresh before the max) and an X.509
certificate (9 s, not renewable: issued afresh at two thirds of its life). The agents
start in waves of ten, as a rollout's surge would start them. The broker runs as its own
``broker serve`` process (real OpenBao, PostgreSQL store; its defaults, except a 0.2 s
revocation tick), so its CPU time and memory are its own and the test's reads of the
store never stall it.

What must hold, whatever the machine's speed (the test waits for conditions, never
asserts on time):
- every agent is ready, and every pod's login works with the file it has at the end;
- every pod renewed and re-issued (counted in the store: ``lease.renewed`` audit events,
  leases per credential; the agents' logs never count more than the store);
- at every sample, no credential held more than two live leases (not over, not past
  their expiry: the new one and the one it replaced, during its grace period); the
  broker's lease limit is set high so that it cannot hide an agent that leaks;
- no agent and no broker logged a warning or an error, except a call the broker could
  not complete in time on a busy machine, which the agent retries (``RETRIED``; those are
  counted and printed, with what they left behind). On a machine this busy a renewal or a
  rotation can also come after the lease it renews or replaces has expired (a third of
  a 6 s lease is 2 s): the lease then ends ``expired`` rather than given back, and such
  rotations are counted and printed too;
- after SIGTERM every agent exits 0, every instance is terminated by its one job, every
  lease the store holds for the pods has ended with Vault's confirmation (``revoked`` by
  termination, ``released`` after a rotation, ``expired`` as above, or when the
  termination's revocation found it already expired in Vault: a replaced lease not yet
  given back at SIGTERM expires in seconds), Vault knows none of them, and PostgreSQL has
  none of their logins.
The figures are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from broker.dev.environment import dev_settings_dict
from broker.leases.migrations import migrate
from broker.secret import Secret
from tests.conftest import ADMIN_SHA
from tests.harness.agent import KUBERNETES_ISSUER, AgentProcess, Pod, kubernetes_broker
from tests.harness.brokers import BrokerProcess
from tests.harness.databases import PostgresTarget, postgres_target
from tests.harness.pki import Mount, mounted_pki, pki_role
from tests.harness.wait import eventually

pytestmark = pytest.mark.slow

AGENTS = 50
WAVE = 10  # agents started at once; the next wave once these are ready
# How long the agents run once all are ready; the soak also goes on until every pod has
# renewed and re-issued each credential (conditions, not time), within SOAK_BOUND_S.
SOAK_S = 75.0
SOAK_BOUND_S = 240.0
SAMPLE_S = 0.5
CREDENTIALS = ("db=soak-db,format=pgpass", "tls=soak-cert,format=pem")
ROLES = ("soak-db", "soak-cert")
LIVE = ["issuing", "active", "revoking"]  # a lease in these states is not over
ENDED = {"revoked", "released"}  # over, and Vault confirmed it gone
# Over, Vault confirmed it gone, and explained by a retried call (see _explained_end).
ENDED_UNCLAIMED = {"expired", "abandoned"}
RETRIED = "the broker is unavailable; keeping the files and trying again"
TICKS = os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def database(vault, pg) -> Iterator[PostgresTarget]:
    with postgres_target(vault, pg) as target:
        yield target


@pytest.fixture(scope="module")
def pki(vault) -> Iterator[Mount]:
    with mounted_pki(vault, {"issue": pki_role()}) as mount:
        # Rebuild the CRL periodically rather than on each of the soak's revocations
        # (deploy/engines/pki.md): on every revocation the rebuild costs O(revoked).
        status, body = vault.call("POST", f"{mount.path}/config/crl", {"auto_rebuild": True})
        assert status in (200, 204), body
        yield mount


@pytest.fixture(autouse=True)
async def no_agent_left():
    yield
    await AgentProcess.kill_all()


def _settings(issuer, bao, store_url: str, database: PostgresTarget,
              pki: Mount, checkpoint_file: Path) -> dict[str, Any]:
    roles = {
        "soak-db": database.side.broker_role(default_ttl="6s", max_ttl="18s",
                                             max_leases_per_instance=10),
        "soak-cert": {"engine": "pki", "mount": pki.path, "vault_role": "issue", "mode": "issue",
                      "default_ttl": "9s", "max_ttl": "1h", "max_leases_per_instance": 10,
                      "params": {"common_name": "{instance_id}.workload.internal"}},
    }
    data = dev_settings_dict(
        vault_addr=bao.addr, broker_token="", issuer=issuer.issuer,
        jwks_uri=f"{issuer.issuer}/.well-known/jwks.json", store_url=store_url,
        admin_token_sha256=ADMIN_SHA, with_database=False, port=0,
        checkpoint_file=checkpoint_file)  # as deployed: no start-up warning to count
    data["roles"] = roles
    policy = kubernetes_broker(roles)["overrides"]["policy"]
    policy["rules"][0]["allow"] = sorted(roles)  # the soak's roles only
    data["policy"] = policy
    data["identity"]["issuers"][0].update(KUBERNETES_ISSUER)
    data["vault"]["instance_policies"] = ["broker-instance", database.side.policy, pki.policy]
    data["revocation"] = {"tick_s": 0.2}
    data["log_level"] = "warning"
    return data


def _query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute(sql, params).fetchall()


def _proc(pid: int) -> tuple[float, int]:
    """CPU seconds so far and resident memory now (KiB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return cpu, int(line.split()[1])
    return cpu, 0


@dataclass
class Sampler:
    """Samples, until stopped: the live leases per instance and role in the store, and
    the broker's CPU and memory. A lease is live while it is not over and not past its
    expiry: one that Vault expired (a renewal came too late) stays ``active`` in the store
    until the reconciler confirms it gone, and is counted apart (``max_with_expired``)."""

    store_url: str
    broker_pid: int
    samples: int = 0
    max_per_credential: int = 0
    max_per_instance: int = 0
    max_with_expired: int = 0
    worst: tuple[str, str] | None = None
    peak_cpu: float = 0.0  # share of one core over one sample interval
    peak_rss_kib: int = 0

    def _live(self) -> list[tuple[str, str, int, int]]:
        return [(str(i), str(r), int(n), int(m)) for i, r, n, m in _query(
            self.store_url,
            "SELECT instance_id, role, "
            "count(*) FILTER (WHERE expires_at IS NULL OR expires_at > now()), count(*) "
            "FROM leases WHERE state = ANY(%s) GROUP BY instance_id, role", (LIVE,))]

    async def run(self, stop: asyncio.Event) -> None:
        last = (time.monotonic(), _proc(self.broker_pid)[0])
        while not stop.is_set():
            rows = await asyncio.to_thread(self._live)
            per_instance: Counter[str] = Counter()
            for instance, role, n, m in rows:
                per_instance[instance] += n
                self.max_with_expired = max(self.max_with_expired, m)
                if n > self.max_per_credential:
                    self.max_per_credential, self.worst = n, (instance, role)
            self.max_per_instance = max([self.max_per_instance, *per_instance.values()])
            self.samples += 1
            now = time.monotonic()
            cpu, rss = _proc(self.broker_pid)
            self.peak_cpu = max(self.peak_cpu, (cpu - last[1]) / max(now - last[0], 1e-3))
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            last = (now, cpu)
            try:
                await asyncio.wait_for(stop.wait(), SAMPLE_S)
            except TimeoutError:
                pass


def _records(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            records.append({"level": "error", "msg": f"not a log record: {line[:200]}"})
    return records


def _agent_retry(record: dict[str, Any]) -> str | None:
    """A retried call a busy machine explains, by kind; None for anything else."""
    if record.get("msg") != RETRIED:
        return None
    status, code, step = record.get("status"), record.get("code"), record.get("step")
    if status is None:
        return f"{step}: no answer within the agent's timeout"
    if status == 503 and code == "vault_unavailable":
        return f"{step}: Vault did not answer the broker in time"
    if status == 502 and code == "vault_invalid_request" and step == "renew":
        # The renewal came after Vault had expired the lease (a third of a 6 s TTL is
        # 2 s); the agent keeps trying until the broker no longer calls it active.
        return "renew: the lease had expired in Vault"
    return None


def _broker_explained(record: dict[str, Any]) -> bool:
    """The broker's side of an explained retry, and the scheduler skipping a tick whose
    previous run had not finished (the 0.2 s revocation tick on a busy machine) or running
    one late (a maintenance tick whose time passed while the machine was busy: it runs at
    the next one)."""
    msg = record.get("msg", "")
    if "Run time of job" in msg and "was missed by" in msg:  # apscheduler.executors.*
        return str(record.get("logger", "")).startswith("apscheduler.")
    if record.get("logger") == "apscheduler.scheduler":
        return "skipped: maximum number of running instances" in msg
    if msg == "request refused":
        return record.get("code") == "vault_unavailable" or (
            record.get("code"), record.get("route")) == (
            "vault_invalid_request", "/v1/leases/{lease_id}/renew")
    if msg == "vault refused a call":
        return (record.get("vault_path"), record.get("vault_error")) == (
            "/v1/sys/leases/renew", "lease not found")
    return msg == "issuance passed its deadline; outcome in Vault unknown"


def _in_vault(vault, database: PostgresTarget, pki: Mount) -> set[str]:
    """Every lease Vault holds under the soak's two mounts (theirs alone)."""
    held: set[str] = set()
    for prefix in (f"{database.side.mount}/creds/{database.side.vault_role}/",
                   f"{pki.path}/issue/issue/"):
        held |= {prefix + k for k in vault.leases_under(prefix)}
    return held


def _pgpass_login(database: PostgresTarget, pod: Pod) -> bool:
    user, password = (pod.directory / "db").read_text().rstrip("\n").split(":")[3:5]
    try:
        with database.connect(user, password):
            return True
    except psycopg.OperationalError:
        return False  # read as a rotation replaced it, or not yet re-issued: asked again


async def test_fifty_agents_renew_reissue_and_give_everything_back(
        pg, bao, vault, vault_setup, issuer, database, pki, tmp_path):
    name = await asyncio.to_thread(pg.create_database, "broker_soak")
    store_url = pg.url(name)
    broker: BrokerProcess | None = None
    try:
        await asyncio.to_thread(migrate, store_url)
        broker = BrokerProcess.configure(
            tmp_path, "soak", _settings(issuer, bao, store_url, database, pki,
                                       tmp_path / "audit-checkpoints.jsonl"),
            Secret(vault_setup.broker_token))
        async with asyncio.timeout(SOAK_BOUND_S + 600):  # a bound for a wedged run only
            await broker.start()
            await _soak(broker, store_url, vault, database, pki, issuer, tmp_path)
    finally:
        await AgentProcess.kill_all()
        if broker is not None:
            broker.stop()
        await asyncio.to_thread(pg.drop_database, name)


async def _start(pods: list[Pod], url: str) -> list[AgentProcess]:
    agents: list[AgentProcess] = []
    for k in range(0, len(pods), WAVE):
        wave = await asyncio.gather(*(
            AgentProcess.start(p, url, CREDENTIALS, "--on-exit", "terminate")
            for p in pods[k:k + WAVE]))
        agents += wave
        await eventually(lambda w=wave: _all_ready(w), f"wave {k // WAVE} ready", 180, 0.5)
    return agents


async def _all_ready(agents: list[AgentProcess]) -> bool:
    for agent in agents:
        if agent.proc.returncode is not None:
            raise AssertionError(f"an agent exited ({agent.proc.returncode}):\n"
                                 f"{agent.log_text()[-2000:]}")
    answers = await asyncio.gather(*(a.probe() for a in agents))
    return all(x is not None and x[0] == 200 for x in answers)


def _counts(store_url: str) -> tuple[Counter[str], Counter[tuple[str, str]]]:
    """Renewals per instance (audit events) and leases per (instance, role)."""
    renewed = Counter(str(i) for (i,) in _query(
        store_url, "SELECT l.instance_id FROM audit_events e JOIN leases l "
        "ON l.lease_id = e.lease_id WHERE e.action = 'lease.renewed'"))
    issued = Counter((str(i), str(r)) for i, r in _query(
        store_url, "SELECT instance_id, role FROM leases"))
    return renewed, issued


async def _soak(broker: BrokerProcess, store_url: str, vault, database: PostgresTarget,
                pki: Mount, issuer, root: Path) -> None:
    assert broker.proc is not None
    began = time.monotonic()
    cpu0 = _proc(broker.proc.pid)[0]
    stop_sampling = asyncio.Event()
    sampler = Sampler(store_url, broker.proc.pid)
    sampling = asyncio.create_task(sampler.run(stop_sampling))
    pods = [Pod(issuer, root, namespace="soak", service_account=f"sa-{k:02d}")
            for k in range(AGENTS)]
    uids = {p.uid for p in pods}

    agents = await _start(pods, broker.url)
    ready_at = time.monotonic()
    rss_agents = [_proc(a.proc.pid)[1] for a in agents]

    def soaked() -> bool:
        if time.monotonic() - ready_at < SOAK_S:
            return False  # the soak's length: here time passing is the point
        renewed, issued = _counts(store_url)
        return all(renewed[u] >= 2 and all(issued[u, r] >= 2 for r in ROLES) for u in uids)

    await eventually(lambda: asyncio.to_thread(soaked),
                     "every pod renewed twice and re-issued each credential", SOAK_BOUND_S, 1.0)

    # Still every agent ready, and every pod logs in with the file it has now.
    await eventually(lambda: _all_ready(agents), "every agent still ready", 150, 0.5)
    pending = set(range(AGENTS))

    async def logins() -> bool:
        ok = await asyncio.gather(*(asyncio.to_thread(_pgpass_login, database, pods[k])
                                    for k in sorted(pending)))
        pending.difference_update(k for k, good in zip(sorted(pending), ok, strict=True) if good)
        return not pending

    await eventually(logins, lambda: f"{len(pending)} pods log in with their pgpass", 150, 0.5)
    soak_s = time.monotonic() - ready_at
    # The check made after SIGTERM sees the pods' leases in Vault while they are there.
    in_vault = await asyncio.to_thread(_in_vault, vault, database, pki)
    current = await asyncio.to_thread(
        _query, store_url, "SELECT vault_lease_id FROM leases WHERE state = 'active'")
    assert {str(v) for (v,) in current} & in_vault

    # SIGTERM to every agent at once.
    sent, sent_wall = time.monotonic(), datetime.now(UTC)
    for agent in agents:
        agent.proc.send_signal(signal.SIGTERM)
    codes = await asyncio.gather(*(asyncio.wait_for(a.proc.wait(), 120) for a in agents))
    exited_s = time.monotonic() - sent
    assert codes == [0] * AGENTS, [(str(a.log), c) for a, c in zip(agents, codes, strict=True)
                                   if c != 0]

    def none_live() -> bool:
        return not _query(store_url, "SELECT 1 FROM leases WHERE state = ANY(%s) LIMIT 1",
                          (LIVE,))

    await eventually(lambda: asyncio.to_thread(none_live), "no live lease after SIGTERM",
                     180, 0.2)
    gone_s = time.monotonic() - sent
    stop_sampling.set()
    await sampling
    cpu_s, wall_s = _proc(broker.proc.pid)[0] - cpu0, time.monotonic() - began

    # What the agents and the broker logged: explained retries, and anything else.
    retries: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    logged: Counter[str] = Counter()
    late: list[float] = []  # how long after the old lease's expiry a rotation was written
    given_back: set[str] = set()  # replaced leases an agent gave back (or gave up on)
    for agent in agents:
        expiry: dict[str, datetime] = {}  # lease id -> the last expiry the agent learned
        for r in _records(agent.log_text()):
            if r.get("msg") == "replaced lease given back":
                given_back.add(str(r.get("lease_id")))
            if r.get("msg") == "lease renewed":
                logged["renewed"] += 1
            elif r.get("msg") == "credential written" and r.get("rotation"):
                logged["reissued"] += 1
                was = expiry.get(r.get("replaced_lease", ""))
                at = datetime.fromisoformat(r["ts"])
                if was is not None and at >= was:
                    late.append((at - was).total_seconds())
            if r.get("lease_id") and r.get("expires_at"):
                expiry[r["lease_id"]] = datetime.fromisoformat(r["expires_at"])
            if r.get("level") in ("warning", "error", "critical"):
                kind = _agent_retry(r)
                if kind:
                    retries[kind] += 1
                else:
                    problems[f"agent: {r.get('msg')}"] += 1
    skipped_ticks = 0
    for r in _records(broker.log.read_text(errors="replace")):
        if r.get("level") in ("warning", "error", "critical"):
            if not _broker_explained(r):
                said = " ".join(
                    str(r[k]) for k in ("code", "vault_path", "vault_error") if r.get(k))
                problems[f"broker: {r.get('msg')} {said}".strip()] += 1
            elif r.get("logger") == "apscheduler.scheduler":
                skipped_ticks += 1

    # The store and Vault after SIGTERM.
    instances = dict(_query(store_url, "SELECT instance_id, state FROM instances"))
    jobs = Counter(s for (s,) in _query(store_url, "SELECT state FROM revocation_jobs"))
    leases = _query(store_url, "SELECT state, vault_lease_id FROM leases")
    states = Counter(str(s) for s, _ in leases)
    renewed, issued = await asyncio.to_thread(_counts, store_url)
    # Given back (or renewed) by its agent only after Vault had expired it: the broker
    # records what Vault says, ``expired`` (a busy machine's late release, not a leak: a
    # leaked lease is ended by the reconciler).
    [(given_late,)] = await asyncio.to_thread(
        _query, store_url,
        "SELECT count(*) FROM audit_events WHERE action = 'lease.expired' AND actor = 'workload'")
    # Those still unexpired at SIGTERM that the termination found already expired in Vault
    # (a replaced lease the agent had not yet given back, or a current one near its end):
    # Vault confirmed them gone, past their expiry, so the revocation worker recorded them
    # ``expired``. One that had expired before SIGTERM is not counted here: it must be
    # explained as below.
    at_exit = {str(i) for (i,) in await asyncio.to_thread(
        _query, store_url,
        "SELECT e.lease_id FROM audit_events e JOIN leases l ON l.lease_id = e.lease_id "
        "WHERE e.action = 'lease.expired' AND e.actor LIKE 'revocation:%%' "
        "AND e.at >= %s AND l.expires_at >= %s", (sent_wall, sent_wall))}
    reissues = {r: sum(n - 1 for (_, role), n in issued.items() if role == r) for r in ROLES}
    in_vault = await asyncio.to_thread(_in_vault, vault, database, pki)
    logins_left = await asyncio.to_thread(
        _query, database.server.admin_url,
        "SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)", (database.login_prefix,))

    print(f"\nsoak: {AGENTS} agents (waves of {WAVE}), all ready {ready_at - began:.0f}s after "
          f"the first started, then {soak_s:.0f}s; credentials: db 6s lease (18s max), "
          f"cert 9s")
    print(f"renewals: {sum(renewed.values())} in the store ({logged['renewed']} in the agents' "
          f"logs); fewest for one pod: {min(renewed[u] for u in uids)}")
    print(f"re-issues: db {reissues['soak-db']}, cert {reissues['soak-cert']} in the store "
          f"({logged['reissued']} in the agents' logs)")
    print(f"leases: {len(leases)}, ended {dict(states)}; in Vault now: {len(in_vault)}")
    print(f"live leases at most {sampler.max_per_credential} per credential, "
          f"{sampler.max_per_instance} per instance ({sampler.samples} samples, every "
          f"{SAMPLE_S}s); with those past expiry still active in the store: "
          f"{sampler.max_with_expired} per credential")
    print(f"retried (explained): {dict(retries) or 0}; other warnings or errors: "
          f"{dict(problems) or 0}; revocation ticks skipped while one ran: {skipped_ticks}")
    print(f"rotations written after the old lease had expired: {len(late)}"
          + (f" (by at most {max(late):.2f}s)" if late else "")
          + f"; leases given back or renewed after Vault had expired them: {given_late}"
          + f"; found expired by the termination: {len(at_exit)}")
    print(f"SIGTERM: all exited 0 within {exited_s:.1f}s, no live lease after {gone_s:.1f}s")
    print(f"broker: {cpu_s:.0f} CPU-s in {wall_s:.0f}s, peak {sampler.peak_cpu:.0%} of a core "
          f"(over {SAMPLE_S}s), resident peak {sampler.peak_rss_kib / 1024:.0f} MiB; agents "
          f"{min(rss_agents) / 1024:.0f}-{max(rss_agents) / 1024:.0f} MiB resident each")

    assert not problems, problems
    assert instances == dict.fromkeys(uids, "terminated")
    assert jobs == {"done": AGENTS}
    assert set(states) <= ENDED | ENDED_UNCLAIMED, states
    # A lease that ended unclaimed (expired, or abandoned in issuing) is one that a retried
    # call left behind, or one replaced only after it had expired (the agent gives back
    # only what is still live; the reconciler confirms the rest gone): never more of them.
    # Whoever recorded its end (the agent's late release, or the reconciler first), a
    # replaced lease its agent gave back was not leaked: count only the others.
    unclaimed_ids = {str(i) for (i,) in await asyncio.to_thread(
        _query, store_url, "SELECT lease_id FROM leases WHERE state IN ('expired', 'abandoned')")}
    unexplained = sorted(unclaimed_ids - given_back - at_exit)
    unclaimed = len(unexplained)
    if unclaimed > sum(retries.values()) + len(late) + given_late:
        _explain_unclaimed(store_url, unexplained, agents)
    # The rest: a rotation written after the old lease had expired, or a renewal that
    # reached the broker after Vault had expired the lease (recorded by the workload).
    assert unclaimed <= sum(retries.values()) + len(late) + given_late, (
        states, retries, late, given_late, len(at_exit))
    assert sampler.max_per_credential <= 2, (sampler.max_per_credential, sampler.worst)
    assert not {str(v) for _, v in leases} & in_vault
    assert logins_left == []
    assert set(renewed) == uids
    assert logged["renewed"] <= sum(renewed.values())
    assert 0 < logged["reissued"] <= sum(reissues.values())


def _explain_unclaimed(store_url: str, ids: list[str], agents: list[AgentProcess]) -> None:
    """Print what the store and the agents' logs say of leases that ended unclaimed."""
    rows = _query(store_url, "SELECT lease_id, role, state, issued_at, expires_at, ended_at, "
                  "updated_at FROM leases WHERE lease_id = ANY(%s)", (ids,))
    events = _query(store_url, "SELECT lease_id, at, actor, action FROM audit_events "
                    "WHERE lease_id = ANY(%s) ORDER BY id", (ids,))
    by_role = Counter(str(r[1]) for r in rows)
    print(f"\nunclaimed, by role: {dict(by_role)}")
    texts = [a.log_text() for a in agents]
    for row in rows[:12]:
        lid = str(row[0])
        print(f"  {row}")
        for e in events:
            if str(e[0]) == lid:
                print(f"    audit {e[1:]}")
        for text in texts:
            for line in text.splitlines():
                if lid in line:
                    print(f"    agent {line[:400]}")
