"""Every statement on the exchange, renewal, termination, revocation, reconcile and replay
paths is index-backed on PostgreSQL (issue 15): the cost of a request must not grow with
the store.

The ledgers run their real SQL on a migrated database whose every connection explains each
statement it runs, nested ones included (``tests.harness.plans``), with sequential scans
disabled: the planner takes an index whenever one can serve, so a ``Seq Scan`` (or a walk
of a whole index with no index condition) on a big table that remains means no index can.

An empty database is not enough, though: without rows and statistics the planner picks
among indexes by luck, and an index condition that does not narrow (a state most rows are
in, ``IS NOT NULL``) looks as good as a primary key. So the database first holds a fleet
of its own (``BACKGROUND``: the same issuer, workload, role and Vault path as the rows the
test writes, mostly history, as a store that has run for a while), analyzed, and every
scan of a big table may read at most ``MAX_ROWS_READ`` rows: the rows the test's own
statements are about are a handful, so a scan that reads more is reading the fleet.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import asyncpg
import psycopg
import pytest

from broker.clock import FixedClock
from broker.errors import LeaseLimitReached
from broker.leases import Database, LeaseLimit, LeaseState, Ledgers, Selection
from broker.leases.database import OneTrip
from broker.leases.ending import Ending
from broker.leases.locks import LockSubject
from broker.leases.migrations import migrate
from broker.leases.settings import StoreSettings
from tests.harness.plans import FullScan, PlanCapture, explain_every_statement, partial_indexes
from tests.integration.leases.support import T0

# The tables that grow with the fleet and its history: no statement on these paths may
# read one whole.
BIG_TABLES = {
    "leases",
    "instances",
    "instance_tokens",
    "audit_events",
    "seen_tokens",
    "revocation_jobs",
    "audit_checkpoints",
}
# Not checked, and why each may be read whole:
# - audit_head: one row (id 1), by construction.
# - alembic_version: one row.
# - locks: an operator's incident locks, a handful alive at a time; and the active ones are
#   still read through ix_locks_removed (removed ones are never read on these paths). It is
#   left out only so that a lock listing an operator asks for is not held to this rule.
SMALL_TABLES = {"audit_head", "alembic_version", "locks"}

# A scan of a big table may read this many rows (returned or filtered out); the rows each
# step is about are under ten, the background fleet thousands.
MAX_ROWS_READ = 50

# (step, table) of scans known to read the fleet today, each waiting for its index (a
# proposal beside it): empty this set as the indexes land. The test fails on an entry that
# no longer happens, so a stale one cannot hide a new scan of the same statement.
# (Migration 0009 indexed the reconciler's three: its Vault paths, read as a loose index
# scan; a page of the live leases under one path; an issuer's unseen instances.)
KNOWN_MISSING: set[tuple[str, str]] = set()

# (step, table) whose answer is every row it reads: not a scan to narrow.
WHOLE_ANSWER = {
    # A source that relists what exists asks for all of its issuer's active instances.
    ("termination.active_instance_ids", "instances"),
}

# A store that has run for a while, sharing the test's names (issuer dev, workload w, role
# r, Vault path pki/issue/r): 2,000 instances (half terminated, with their done jobs),
# 10,000 leases (2,000 live, expiring in a month; the rest ended), their tokens, used token
# ids not yet expired and audit events (negative seq: out of the chain's way).
BACKGROUND = """
INSERT INTO instances (instance_id, issuer_name, workload, state, created_at, updated_at,
                       last_seen_at, terminated_at)
SELECT 'bg-' || n, 'dev', 'w', CASE WHEN n %% 2 = 0 THEN 'active' ELSE 'terminated' END,
       %(t0)s - interval '30 days', %(t0)s, %(t0)s + interval '2 hours',
       CASE WHEN n %% 2 = 1 THEN %(t0)s - interval '1 day' END
FROM generate_series(0, 1999) n;
INSERT INTO revocation_jobs (job_id, instance_id, state, attempts, next_attempt_at,
                             requested_by, created_at, updated_at, completed_at)
SELECT 'bg-j-' || n, 'bg-' || n, 'done', 1, %(t0)s - interval '1 day', 'admin',
       %(t0)s - interval '1 day', %(t0)s - interval '1 day', %(t0)s - interval '1 day'
FROM generate_series(1, 1999, 2) n;
INSERT INTO leases (lease_id, instance_id, workload, role, kind, state, vault_lease_id,
                    token_accessor, renewable, created_at, updated_at, issued_at,
                    expires_at, ended_at, vault_path)
SELECT 'bg-l-' || n, 'bg-' || (n %% 2000), 'w', 'r', 'k',
       CASE WHEN n %% 2 = 1 THEN 'revoked' WHEN n < 4000 THEN 'active' ELSE 'released' END,
       'pki/issue/r/bg-' || n, 'bg-acc-' || (n %% 2000), true,
       %(t0)s - interval '20 days' + n * interval '1 second', %(t0)s,
       %(t0)s - interval '20 days',
       CASE WHEN n %% 2 = 0 AND n < 4000 THEN %(t0)s + interval '30 days'
            ELSE %(t0)s - interval '19 days' END,
       CASE WHEN n %% 2 = 1 OR n >= 4000 THEN %(t0)s - interval '19 days' END,
       'pki/issue/r'
FROM generate_series(0, 9999) n;
INSERT INTO instance_tokens (accessor, instance_id, created_at, expires_at, revoked_at)
SELECT 'bg-acc-' || n, 'bg-' || n, %(t0)s - interval '30 days', %(t0)s + interval '30 days',
       CASE WHEN n %% 2 = 1 THEN %(t0)s - interval '1 day' END
FROM generate_series(0, 1999) n;
INSERT INTO seen_tokens (issuer_name, jti, expires_at)
SELECT 'dev', 'bg-jti-' || n, %(t0)s + interval '1 day' FROM generate_series(0, 9999) n;
INSERT INTO audit_events (seq, at, actor, action, instance_id, lease_id, outcome, detail,
                          prev_hash, hash)
SELECT -n, %(t0)s - interval '20 days', 'workload', 'lease.issued', 'bg-' || (n %% 2000),
       'bg-l-' || n, 'ok', '{}', '', '' FROM generate_series(1, 10000) n;
ANALYZE;
"""

SUBJECT = LockSubject(issuer="dev", workload="w", role="r", claims={"team": "pay"})


@asynccontextmanager
async def explained_ledgers(pg) -> AsyncIterator[tuple[Ledgers, FixedClock, PlanCapture]]:
    name = await asyncio.to_thread(pg.create_database, "broker_plans")
    try:
        url = pg.url(name)
        await asyncio.to_thread(migrate, url)
        await asyncio.to_thread(_fill, url)
        await asyncio.to_thread(explain_every_statement, pg.admin_url, name)
        capture = PlanCapture()
        capture.partial = await asyncio.to_thread(partial_indexes, url)
        clock = FixedClock(T0)
        with capture.every_connection():
            db = Database(StoreSettings(url=url))
            await db.start()
            # The one-round-trip statements on one plain connection: a connection of
            # asyncpg's pool delivers its notices only until it is first released.
            await db.one_trip.close()  # type: ignore[union-attr]
            db.one_trip = OneTrip(_OneConnection(await asyncpg.connect(url)), 5)  # type: ignore[arg-type]
            try:
                yield Ledgers.on(db, clock, token_key=b"k" * 32), clock, capture
            finally:
                await db.close()
    finally:
        await asyncio.to_thread(pg.drop_database, name)


class _OneConnection:
    """One asyncpg connection standing in for ``OneTrip``'s pool."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @asynccontextmanager
    async def acquire(self, timeout: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        yield self._conn

    async def close(self) -> None:
        await self._conn.close()


def _fill(url: str) -> None:
    # Client-side binding: one round trip for every statement of the script.
    with psycopg.connect(url, autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
        conn.execute(BACKGROUND, {"t0": T0})


async def drive_every_path(s: Ledgers, clock: FixedClock, capture: PlanCapture) -> None:
    """Each ledger call the broker's hot and periodic paths make, with rows for them to
    find, labelled by path so that a failure names where the statement comes from."""
    hour = timedelta(hours=1)

    capture.step = "exchange.begin_issue"
    ticket = await s.issuance.begin_issue(
        instance_id="i-1", issuer_name="dev", workload="w", role="r", kind="k",
        token_id=("jti-1", T0 + hour), vault_path="pki/issue/r", lock_subject=SUBJECT,
        claims={"team": "pay"})
    capture.step = "exchange.record_token"
    await s.issuance.record_token(instance_id="i-1", accessor="acc-1", expires_at=T0 + hour)
    capture.step = "exchange.complete_issue"
    assert await s.issuance.complete_issue(
        ticket.lease_id, vault_lease_id="pki/issue/r/v1", accessor="acc-1", renewable=True,
        issued_at=T0, expires_at=T0 + hour, created_after=T0 - hour, engine="pki",
        token_id=("dev", "jti-1"), lock_subject=SUBJECT, credential_ref={"serial": "01"},
        issuing=ticket.issuing)
    first = ticket.lease_id

    # PostgreSQL's one-round-trip functions, past the fifth run of each, after which
    # PL/pgSQL may plan their statements generically (without the values).
    for n in range(7):
        capture.step = "exchange.begin_issue(one trip)"
        trip = await s.issuance.begin_issue(
            instance_id=f"i-trip-{n % 2}", issuer_name="dev", workload="w", role="r",
            kind="k", token_id=(f"jti-trip-{n}", T0 + hour), limit=LeaseLimit(10, "refuse"),
            vault_path="pki/issue/r", lock_subject=SUBJECT)
        capture.step = "exchange.complete_issue(one trip)"
        await s.issuance.complete_issue(
            trip.lease_id, vault_lease_id=f"pki/issue/r/trip-{n}", accessor="acc-1",
            renewable=True, issued_at=T0, expires_at=T0 + hour, created_after=T0 - hour,
            engine="pki", lock_subject=SUBJECT, issuing=trip.issuing)

    capture.step = "exchange.begin_issue(limit, revoke_oldest)"
    second = await s.issuance.begin_issue(
        instance_id="i-1", issuer_name="dev", workload="w", role="r", kind="k",
        token_id=("jti-2", T0 + hour), limit=LeaseLimit(1, "revoke_oldest"),
        lock_subject=SUBJECT)
    assert [v[0] for v in second.superseded] == [first]
    capture.step = "exchange.begin_issue(limit, refuse)"
    with pytest.raises(LeaseLimitReached):
        await s.issuance.begin_issue(
            instance_id="i-1", issuer_name="dev", workload="w", role="r", kind="k",
            limit=LeaseLimit(1, "refuse"))
    capture.step = "exchange.fail_issue"
    await s.issuance.fail_issue(second.lease_id, "vault_refused",
                                release_token_id=("dev", "jti-2"))

    # A second instance with an active lease, for renewal, release and termination.
    capture.step = "exchange.begin_issue"
    live = (await s.issuance.begin_issue(
        instance_id="i-2", issuer_name="dev", workload="w", role="r", kind="k",
        vault_path="pki/issue/r")).lease_id
    capture.step = "exchange.complete_issue"
    await s.issuance.complete_issue(
        live, vault_lease_id="pki/issue/r/v2", accessor="acc-2", renewable=True,
        issued_at=T0, expires_at=T0 + hour)

    capture.step = "renewal.get_lease"
    await s.issuance.get_lease(live)
    capture.step = "renewal.instance_state"
    await s.issuance.instance_state("i-2")
    capture.step = "renewal.refuse_if_locked"
    await s.issuance.refuse_if_locked(SUBJECT)
    capture.step = "renewal.set_lease_expiry"
    await s.issuance.set_lease_expiry(live, T0 + 2 * hour, True, SUBJECT)

    capture.step = "replay.use_once"
    assert await s.replay.use_once("webhook", "sig-1", keep_until=T0 + hour)
    assert not await s.replay.use_once("webhook", "sig-1", keep_until=T0 + hour)
    capture.step = "replay.is_used"
    await s.replay.is_used("webhook", "sig-1")
    capture.step = "sightings.mark_seen"
    await s.sightings.mark_seen(["i-1", "i-2"], T0)

    capture.step = "reconcile.past_expiry"
    await s.reconcile.past_expiry(before=T0 + 3 * hour, limit=100)
    capture.step = "reconcile.stuck_issuing"
    stuck = (await s.issuance.begin_issue(
        instance_id="i-2", issuer_name="dev", workload="w", role="r", kind="k")).lease_id
    await s.reconcile.stuck_issuing(created_before=T0 + hour, limit=100)
    capture.step = "reconcile.settle_stuck"
    assert await s.reconcile.settle_stuck(stuck, revoked=[], actor="reconciler")
    capture.step = "reconcile.vault_lease_states"
    await s.reconcile.vault_lease_states(["pki/issue/r/v1", "pki/issue/r/v2"])
    capture.step = "reconcile.vault_paths"
    await s.reconcile.vault_paths()
    capture.step = "reconcile.unsent_live_under"
    _, cursor = await s.reconcile.unsent_live_under(
        "pki/issue/r", expiring_after=T0, limit=1)
    await s.reconcile.unsent_live_under(
        "pki/issue/r", expiring_after=T0, after=cursor or (T0, ""), limit=1)
    capture.step = "reconcile.correct_expiry"
    await s.reconcile.correct_expiry(live, T0 + 3 * hour)
    capture.step = "reconcile.unseen_instances"
    await s.reconcile.unseen_instances("dev", seen_before=T0 + hour, limit=100)
    capture.step = "termination.active_instance_ids"
    await s.termination.active_instance_ids("dev")
    capture.step = "reconcile.try_exclusive"
    async with s.reconcile.try_exclusive("reconcile"):
        pass

    capture.step = "renewal.end_lease"
    released = (await s.issuance.begin_issue(
        instance_id="i-2", issuer_name="dev", workload="w", role="r", kind="k")).lease_id
    await s.issuance.complete_issue(
        released, vault_lease_id="pki/issue/r/v3", accessor="acc-2", renewable=True,
        issued_at=T0, expires_at=T0 + hour)
    assert await s.issuance.end_lease(released, LeaseState.RELEASED, "workload")

    capture.step = "termination.request_termination"
    await s.termination.request_termination("i-1", actor="admin", issuer="dev",
                                            reason="test")
    await s.termination.request_termination("i-never", actor="events", issuer="dev")
    capture.step = "termination.terminate_next"
    for n in range(3):
        await s.issuance.begin_issue(instance_id=f"i-bulk-{n}", issuer_name="dev",
                                     workload="bulk", role="r", kind="k")
    batch = await s.selection.terminate_next(
        Selection(workloads=("bulk",)), after=None, limit=2, actor="admin", reason=None,
        incident=None, check=lambda _: None)
    await s.selection.terminate_next(
        Selection(workloads=("bulk",)), after=batch.next, limit=2, actor="admin",
        reason=None, incident=None, check=lambda _: None)

    claim = timedelta(seconds=60)
    capture.step = "revocation.claim_jobs"
    jobs = await s.jobs.claim_jobs(worker="w1", limit=10, claim_for=claim)
    job = next(j for j in jobs if j.instance_id == "i-1")
    capture.step = "revocation.extend_claim"
    assert await s.jobs.extend_claim(job, worker="w1", claim_for=claim)
    capture.step = "revocation.revocation_work"
    work = await s.jobs.revocation_work("i-1")
    capture.step = "revocation.record_confirmed"
    await s.jobs.record_confirmed("i-1", tokens=["acc-1"], revoked=[], actor="revocation")
    capture.step = "revocation.mark_revoke_sent"
    ids = [lease.lease_id for lease in work.leases]
    await s.ending.mark_revoke_sent(ids, T0)
    capture.step = "revocation.clear_revoke_sent"
    await s.ending.clear_revoke_sent(ids, T0)
    capture.step = "revocation.mark_leases_ended"
    await s.jobs.mark_leases_ended(ids, LeaseState.REVOKED, actor="revocation")
    capture.step = "revocation.end_decided"
    await s.ending.end_decided(
        await s.issuance.get_lease(live), Ending(LeaseState.LOST), actor="revocation",
        engine="pki", found_by="revocation", why="vault forgot it")
    capture.step = "revocation.finish_job"
    assert await s.jobs.finish_job(job, worker="w1")
    capture.step = "revocation.reschedule_job"
    other = next(j for j in jobs if j.instance_id != "i-1")
    await s.jobs.reschedule_job(other, worker="w1", error="vault_unavailable",
                                next_attempt_at=T0 + hour, give_up=False)
    capture.step = "revocation.superseded_leases"
    await s.jobs.superseded_leases(older_than=timedelta(minutes=5))

    capture.step = "replay.prune"
    clock.advance(2 * 3600)
    await s.replay.prune_seen_tokens(grace=timedelta(minutes=5))


def report(scans: list[FullScan]) -> str:
    """One line per scan, then each statement with its plan."""
    lines = [f"[{f.step}] {f.node} on {f.table}" for f in scans]
    plans = [
        f"[{f.step}] {f.node} on {f.table}\nstatement: {' '.join(f.query.split())}\n"
        f"plan: {f.plan}"
        for f in scans
    ]
    return "\n".join(lines) + "\n\n" + "\n\n".join(plans)


async def test_every_statement_on_the_hot_and_periodic_paths_is_index_backed(pg):
    async with explained_ledgers(pg) as (s, clock, capture):
        await drive_every_path(s, clock, capture)
    assert not capture.unparsed, capture.unparsed

    steps = {p.step for p in capture.plans}
    # The functions ran (a statement only they make was explained, within their step).
    nested = [p for p in capture.plans if p.step.endswith("(one trip)")]
    assert any("INSERT INTO leases" in p.query
               for p in nested), sorted({p.query[:60] for p in nested})
    # Each path's statements were seen (auto_explain is on, nested statements included).
    assert len(capture.plans) > 100 and "(no step)" not in steps, sorted(steps)
    tables = {n.get("Relation Name") for p in capture.plans for n in _scanned(p.plan)}
    assert BIG_TABLES - {"audit_checkpoints"} <= tables, tables

    scans = capture.full_scans(BIG_TABLES, max_rows=MAX_ROWS_READ)
    found = {(f.step, f.table) for f in scans}
    new = [f for f in scans if (f.step, f.table) not in KNOWN_MISSING | WHOLE_ANSWER]
    assert not new, "statements that read a big table whole:\n" + report(new)
    gone = KNOWN_MISSING - found
    assert not gone, f"index-backed now: drop from KNOWN_MISSING {sorted(gone)}"


def _scanned(plan):
    yield plan
    for child in plan.get("Plans", ()):
        yield from _scanned(child)
