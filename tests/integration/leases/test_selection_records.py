"""SelectionRecords on SQLite and PostgreSQL: selectors combine as documented
(``broker.leases.selection``), the blast radius changes nothing, a bulk termination is
idempotent, batched, and reports ids the broker never saw."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from broker.errors import BadRequest, InstanceTerminated
from broker.leases import LeaseState, Selection
from broker.leases import models as m
from broker.revocation.bulk import guard
from tests.integration.leases.support import T0, audit_events, complete


async def issue(s, instance, *, workload="w", role="r", issuer="dev", claims=None):
    ticket = await s.issuance.begin_issue(
        instance_id=instance, issuer_name=issuer, workload=workload, role=role, kind=f"k-{role}",
        claims=claims)
    return ticket.lease_id


async def fleet(s):
    """a1,a2: workload a (team pay); b1: workload b, role db (team ops, groups [x, y]);
    c1: issuer other, no claims; b2: workload b, its lease released."""
    await issue(s, "a1", workload="a", claims={"team": "pay", "n": 1})
    await issue(s, "a2", workload="a", role="db", claims={"team": "pay"})
    await issue(s, "b1", workload="b", role="db", claims={"team": "ops", "groups": ["x", "y"]})
    await issue(s, "c1", workload="c", issuer="other")
    released = await issue(s, "b2", workload="b", role="db")
    await complete(s, released)
    assert await s.issuance.end_lease(released, LeaseState.RELEASED, "workload")


def pick(**kw):
    return Selection(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})


def no_check(n):
    return None


@pytest.mark.parametrize("selection,expected", [
    (pick(workloads=["a"]), ["a1", "a2"]),
    (pick(workloads=["a", "b"]), ["a1", "a2", "b1", "b2"]),
    (pick(workloads=["a", "b"], roles=["db"]), ["a2", "b1"]),
    (pick(roles=["db"]), ["a2", "b1"]),  # b2's db lease is no longer live
    (pick(roles=["r", "db"]), ["a1", "a2", "b1", "c1"]),
    (pick(issuers=["other"]), ["c1"]),
    (pick(claims=[("team", "pay")]), ["a1", "a2"]),
    (pick(claims=[("team", "pay"), ("team", "ops")]), ["a1", "a2", "b1"]),
    (pick(claims=[("team", "ops"), ("groups", "y")]), ["b1"]),
    (pick(claims=[("team", "pay"), ("groups", "y")]), []),
    (pick(claims=[("groups", "x")]), ["b1"]),
    (pick(claims=[("n", "1")]), []),  # a claim compares strings only
    (pick(instances=["a1", "c1", "zz"]), ["a1", "c1"]),
    (pick(instances=["a1", "c1"], workloads=["a"]), ["a1"]),
], ids=["workload", "workloads_or", "workload_and_role", "role_live_only", "roles_or",
        "issuer", "claim", "claim_same_key_or", "claims_and", "claims_and_none", "claim_in_list",
        "claim_number_not_string", "instances", "instances_and_workload"])
async def test_selectors_combine_as_documented(ledgers, selection, expected):
    s = await ledgers()
    await fleet(s)
    radius = await s.selection.blast_radius(selection, top=10, sample=100)
    assert sorted(radius.sample) == expected
    assert radius.instances == len(expected)


async def test_issued_window_and_lease_ids(ledgers):
    s = await ledgers()
    early = await issue(s, "e1")  # at T0
    ledgers.clock.advance(2 * 3600)
    await issue(s, "e2")
    after = pick(issued_after=T0 + timedelta(hours=1))
    before = pick(issued_before=T0 + timedelta(hours=1))
    assert (await s.selection.blast_radius(after, top=5, sample=5)).sample == ("e2",)
    assert (await s.selection.blast_radius(before, top=5, sample=5)).sample == ("e1",)
    by_lease = await s.selection.blast_radius(pick(leases=[early]), top=5, sample=5)
    assert by_lease.sample == ("e1",)


async def test_blast_radius_counts_and_changes_nothing(ledgers):
    s = await ledgers()
    await fleet(s)
    await s.termination.request_termination("a1", actor="operator:admin")

    async def snapshot():
        async with s.database.transaction(readonly=True) as conn:
            return [(await conn.execute(select(func.count()).select_from(t))).scalar_one()
                    for t in (m.Instance, m.Lease, m.RevocationJob, m.AuditEvent)]

    before = await snapshot()
    radius = await s.selection.blast_radius(
        pick(workloads=["a", "b", "c"], instances=["a1", "a2", "b1", "b2", "c1", "ghost"]),
        top=2, sample=2)
    assert await snapshot() == before
    assert (radius.instances, radius.already_terminated) == (4, 1)
    assert radius.leases_by_role == {"db": 2, "r": 1}
    assert radius.leases_by_kind == {"k-db": 2, "k-r": 1}
    assert radius.live_leases == 3
    assert radius.workloads == (("b", 2), ("a", 1)) and radius.workload_count == 3
    assert radius.issuers == {"dev": 3, "other": 1}
    assert radius.never_seen == ("ghost",)
    assert radius.sample == ("a2", "b1")
    assert dict(radius.progress.jobs) == {"pending": 1}
    assert (radius.progress.leases_live, radius.progress.leases_ended) == (1, 0)


async def test_bulk_termination_batches_is_idempotent_and_tombstones_never_seen(ledgers):
    s = await ledgers()
    for i in range(7):
        await issue(s, f"i{i}", workload="hot")
    await issue(s, "cold", workload="cold")
    chosen = pick(workloads=["hot"])
    seen: list[str] = []
    after = None
    for _ in range(10):
        batch = await s.selection.terminate_next(
            chosen, after=after, limit=3, actor="operator:alice", reason="leak", incident="INC-1",
            check=no_check)
        seen += [t.instance_id for t in batch.terminated]
        assert all(t.leases == 1 for t in batch.terminated)
        after = batch.next
        if after is None:
            break
    assert seen == [f"i{i}" for i in range(7)]
    again = await s.selection.terminate_next(
        chosen, after=None, limit=3, actor="operator:alice", reason="leak", incident=None,
        check=no_check)
    assert (again.terminated, again.next, again.reachable) == ((), None, 0)
    jobs = await s.admin.list_jobs()
    assert sorted(j.instance_id for j in jobs) == seen
    async with s.database.transaction(readonly=True) as conn:
        rows = (await conn.execute(select(m.RevocationJob.reason, m.RevocationJob.incident,
                                          m.RevocationJob.requested_by))).all()
    assert {tuple(r) for r in rows} == {("leak", "INC-1", "operator:alice")}
    events = await audit_events(s, "i3")
    assert events[-1]["action"] == "instance.terminate_requested"
    assert events[-1]["detail"]["incident"] == "INC-1"
    assert (await s.issuance.instance_state("cold")) == ("active", "dev")

    # Never seen: tombstoned on the first batch, reported on every rerun.
    ghosts = pick(instances=["ghost-1", "i0"])
    first = await s.selection.terminate_next(
        ghosts, after=None, limit=10, actor="operator:alice", reason=None, incident=None,
        check=no_check)
    assert [t.instance_id for t in first.terminated] == ["ghost-1"]
    assert first.never_seen == ("ghost-1",) and first.terminated[0].leases == 0
    with pytest.raises(InstanceTerminated):
        await issue(s, "ghost-1")
    rerun = await s.selection.terminate_next(
        ghosts, after=None, limit=10, actor="operator:alice", reason=None, incident=None,
        check=no_check)
    assert (rerun.never_seen, rerun.terminated) == (("ghost-1",), ())
    assert len(await s.admin.list_jobs()) == 8


async def test_the_guard_refuses_before_anything_is_written(ledgers):
    s = await ledgers()
    for i in range(3):
        await issue(s, f"g{i}")

    def check(n):
        guard(n, reason=None, max_instances=None)

    with pytest.raises(BadRequest) as info:
        await s.selection.terminate_next(pick(workloads=["w"]), after=None, limit=10,
                                         actor="operator:a", reason=None, incident=None,
                                         check=check)
    assert info.value.code == "reason_required"
    assert await s.admin.list_jobs() == []


async def test_claims_recorded_at_first_issuance_only(ledgers):
    s = await ledgers()
    await issue(s, "k1", claims={"team": "a"})
    await issue(s, "k1", claims={"team": "b"})
    await issue(s, "k2")
    async with s.database.transaction(readonly=True) as conn:
        rows = dict((await conn.execute(select(m.Instance.instance_id, m.Instance.claims))).all())
    assert rows == {"k1": {"team": "a"}, "k2": None}


async def test_an_instance_appearing_behind_the_cursor_is_left_and_said(ledgers):
    """Finding 6 (PoC poc_cursor): an instance of the workload that first exchanges while
    the batches run, its id sorting before the cursor, was never visited and the last batch
    said nothing. The last batch now says what is left; a pass from no cursor ends it."""
    s = await ledgers()
    for iid in ("pod-m1", "pod-m2", "pod-m3", "pod-m4"):
        await complete(s, await issue(s, iid))
    chosen = pick(workloads=["w"])

    async def batch(after):
        return await s.selection.terminate_next(
            chosen, after=after, limit=2, actor="operator:alice", reason="INC",
            incident=None, check=no_check)

    b1 = await batch(None)
    assert ([t.instance_id for t in b1.terminated], b1.next, b1.left) == (
        ["pod-m1", "pod-m2"], "pod-m2", None)
    await complete(s, await issue(s, "pod-a0"))  # the compromised workload spawns a pod
    b2 = await batch(b1.next)
    assert [t.instance_id for t in b2.terminated] == ["pod-m3", "pod-m4"]
    b3 = await batch(b2.next)
    assert (b3.terminated, b3.next, b3.left) == ((), None, 1)
    again = await batch(None)  # the next pass
    assert ([t.instance_id for t in again.terminated], again.next, again.left) == (
        ["pod-a0"], None, 0)
    assert (await s.selection.blast_radius(chosen, top=5, sample=5)).instances == 0


async def test_a_bulk_rerun_queues_failed_jobs_again(ledgers):
    """As terminating one instance again does: its failed job goes back to pending, with a
    revocation.requeued event; jobs not failed are left as they are."""
    s = await ledgers()
    for iid in ("f1", "f2", "f3"):
        await complete(s, await issue(s, iid))
    chosen = pick(workloads=["w"])
    first = await s.selection.terminate_next(
        chosen, after=None, limit=10, actor="operator:alice", reason="INC", incident=None,
        check=no_check)
    assert len(first.terminated) == 3 and first.left == 0
    for _ in range(2):
        [job] = await s.jobs.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))
        await s.jobs.reschedule_job(job, worker="w", error="vault_unavailable",
                                    next_attempt_at=T0, give_up=True)
    failed = {j.instance_id: j.job_id for j in await s.admin.list_jobs(state="failed")}
    assert len(failed) == 2
    radius = await s.selection.blast_radius(chosen, top=5, sample=5)
    assert radius.progress.jobs == {"failed": 2, "pending": 1}

    # Batches of one: each re-queues one failed job, the last says nothing is left.
    done: list[tuple[str, str]] = []
    after = None
    for _ in range(5):
        batch = await s.selection.terminate_next(
            chosen, after=after, limit=1, actor="operator:bob", reason="again",
            incident="INC-2", check=no_check)
        done += [(t.instance_id, t.job_id) for t in batch.terminated]
        after = batch.next
        if after is None:
            break
    assert sorted(done) == sorted(failed.items()) and batch.left == 0
    radius = await s.selection.blast_radius(chosen, top=5, sample=5)
    assert radius.progress.jobs == {"pending": 3}
    for iid in failed:
        event = (await audit_events(s, iid))[-1]
        assert (event["action"], event["detail"]["job_id"], event["detail"]["incident"]) == (
            "revocation.requeued", failed[iid], "INC-2")
    rerun = await s.selection.terminate_next(
        chosen, after=None, limit=10, actor="operator:bob", reason="again", incident=None,
        check=no_check)
    assert (rerun.terminated, rerun.left) == ((), 0)
