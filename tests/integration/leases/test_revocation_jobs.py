"""RevocationJobRecords: claims, attempts, and finishing a job, under the job state table."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from broker.leases import JobState, LeasesStillLive, LeaseState
from broker.leases.states import JOB_TRANSITIONS
from tests.integration.leases.support import T0, complete, issue


async def test_two_replicas_claim_disjoint_jobs(ledgers):
    a, b = await ledgers(), await ledgers()
    for i in range(20):
        await a.termination.request_termination(f"i-{i}", actor="admin")
    got_a, got_b = await asyncio.gather(
        a.jobs.claim_jobs(worker="A", limit=15, claim_for=timedelta(seconds=60)),
        b.jobs.claim_jobs(worker="B", limit=15, claim_for=timedelta(seconds=60)),
    )
    ids_a, ids_b = {j.job_id for j in got_a}, {j.job_id for j in got_b}
    assert not ids_a & ids_b
    rest = await a.jobs.claim_jobs(worker="A", limit=50, claim_for=timedelta(seconds=60))
    assert len(ids_a) + len(ids_b) + len(rest) == 20
    assert all(j.state == "running" and j.attempts == 1 for j in got_a + got_b + rest)


async def test_a_lapsed_claim_is_taken_over_and_the_old_worker_cannot_finish(ledgers):
    s = await ledgers()
    await s.termination.request_termination("i-lapse", actor="admin")
    [job] = await s.jobs.claim_jobs(worker="dead", limit=5, claim_for=timedelta(seconds=30))
    assert await s.jobs.claim_jobs(worker="new", limit=5, claim_for=timedelta(seconds=30)) == []
    ledgers.clock.advance(31)
    [again] = await s.jobs.claim_jobs(worker="new", limit=5, claim_for=timedelta(seconds=30))
    assert again.job_id == job.job_id and again.attempts == 2
    assert await s.jobs.finish_job(job, worker="dead") is False
    assert await s.jobs.finish_job(again, worker="new") is True
    instance, _, shown = await s.admin.get_instance("i-lapse")
    assert (instance.state, shown.state) == ("terminated", "done")


async def test_a_job_that_gives_up_stays_visible_and_can_be_requeued(ledgers):
    s = await ledgers()
    await s.termination.request_termination("i-fail", actor="admin")
    [job] = await s.jobs.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))
    await s.jobs.reschedule_job(
        job,
        worker="w",
        error="vault_unavailable",
        next_attempt_at=T0 + timedelta(seconds=5),
        give_up=True,
    )
    [failed] = await s.admin.list_jobs(state="failed")
    assert (failed.job_id, failed.last_error) == (job.job_id, "vault_unavailable")
    ledgers.clock.advance(3600)
    assert await s.jobs.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30)) == []
    counts = await s.admin.counts()
    assert counts.failed_jobs == 1 and counts.queue_depth == 0
    requeued = (await s.termination.request_termination("i-fail", actor="admin")).job
    assert (requeued.state, requeued.attempts) == ("pending", 0)
    [claimed] = await s.jobs.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))
    assert claimed.job_id == job.job_id


async def test_retry_is_not_claimed_before_its_time(ledgers):
    s = await ledgers()
    await s.termination.request_termination("i-later", actor="admin")
    [job] = await s.jobs.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))
    await s.jobs.reschedule_job(
        job, worker="w", error="x", next_attempt_at=T0 + timedelta(seconds=10), give_up=False
    )
    assert await s.jobs.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30)) == []
    ledgers.clock.advance(11)
    assert len(await s.jobs.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))) == 1


async def test_end_lease_and_bulk_mark_follow_the_state_machine(ledgers):
    s = await ledgers()
    ids = [await issue(s, "i-bulk") for _ in range(3)]
    for lease_id in ids[:2]:
        await complete(s, lease_id)
    # An issuing lease cannot be released; an active one can, once.
    assert await s.issuance.end_lease(ids[2], LeaseState.RELEASED, actor="workload") is False
    assert await s.issuance.end_lease(ids[0], LeaseState.RELEASED, actor="workload") is True
    assert await s.issuance.end_lease(ids[0], LeaseState.RELEASED, actor="workload") is False
    # Revoked only from active; abandoned only from issuing — never over an active lease.
    assert await s.jobs.mark_leases_ended(ids, LeaseState.ABANDONED, actor="w") == 1
    assert await s.jobs.mark_leases_ended(ids, LeaseState.REVOKED, actor="w") == 1
    states = {x.lease_id: x.state for x in await s.admin.list_leases(instance="i-bulk")}
    assert states == {ids[0]: "released", ids[1]: "revoked", ids[2]: "abandoned"}


async def test_a_job_cannot_finish_while_a_lease_is_live(ledgers):
    s = await ledgers()
    lease_id = await issue(s, "i-live")
    await s.termination.request_termination("i-live", actor="admin")
    [job] = await s.jobs.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))
    with pytest.raises(LeasesStillLive):
        await s.jobs.finish_job(job, worker="w")
    await s.issuance.complete_issue(
        lease_id,
        vault_lease_id="v/live",
        accessor="a",
        renewable=False,
        issued_at=T0,
        expires_at=T0,
    )  # completes after termination
    with pytest.raises(LeasesStillLive):
        await s.jobs.finish_job(job, worker="w")
    await s.jobs.mark_leases_ended([lease_id], LeaseState.REVOKED, actor="w")
    assert await s.jobs.finish_job(job, worker="w") is True


async def test_a_pass_that_only_waited_is_not_an_attempt(ledgers):
    s = await ledgers()
    await s.termination.request_termination("i-wait", actor="admin")
    for _ in range(5):
        [job] = await s.jobs.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))
        await s.jobs.reschedule_job(
            job,
            worker="w",
            error="revocation_waiting",
            next_attempt_at=T0,
            give_up=False,
            count_attempt=False,
        )
    [job] = await s.jobs.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))
    assert job.attempts == 1


async def test_a_done_job_moves_no_further(ledgers):
    s = await ledgers()
    await s.termination.request_termination("i-done", actor="admin")
    [job] = await s.jobs.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))
    assert await s.jobs.finish_job(job, worker="w") is True
    # The table has no move out of done: finishing, rescheduling or claiming it again
    # changes nothing.
    assert await s.jobs.finish_job(job, worker="w") is False
    await s.jobs.reschedule_job(job, worker="w", error="x", next_attempt_at=T0, give_up=True)
    assert await s.jobs.extend_claim(job, worker="w", claim_for=timedelta(seconds=30)) is False
    ledgers.clock.advance(3600)
    assert await s.jobs.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30)) == []
    [shown] = await s.admin.list_jobs()
    assert (shown.state, shown.attempts, shown.last_error) == ("done", 1, None)


async def test_the_job_state_table_governs_every_transition(ledgers, monkeypatch):
    s = await ledgers()
    await s.termination.request_termination("i-table", actor="admin")
    [job] = await s.jobs.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))
    # A table without running → done: the ledger refuses to express that move, and the
    # job stays as it was.
    monkeypatch.setitem(
        JOB_TRANSITIONS, JobState.RUNNING, JOB_TRANSITIONS[JobState.RUNNING] - {JobState.DONE}
    )
    with pytest.raises(ValueError, match="cannot move from running to done"):
        await s.jobs.finish_job(job, worker="w")
    monkeypatch.setitem(JOB_TRANSITIONS, JobState.FAILED, frozenset())
    await s.jobs.reschedule_job(job, worker="w", error="x", next_attempt_at=T0, give_up=True)
    with pytest.raises(ValueError, match="cannot move from failed to pending"):
        await s.termination.request_termination("i-table", actor="admin")
    [shown] = await s.admin.list_jobs()
    assert shown.state == "failed"


async def test_the_jobs_end_records_revoked_only_a_lease_a_revocation_of_ours_covers(ledgers):
    """A guard under the worker's bookkeeping: a lease with no ``revoke_sent_at`` is not
    recorded ``revoked`` by the job's end, which then refuses while it is live."""
    s = await ledgers()
    stamped, bare = await issue(s, "i-guard"), await issue(s, "i-guard")
    for lease_id in (stamped, bare):
        await complete(s, lease_id)
    await s.termination.request_termination("i-guard", actor="admin")
    [job] = await s.jobs.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))
    await s.ending.mark_revoke_sent([stamped], T0)
    with pytest.raises(LeasesStillLive):
        await s.jobs.finish_job(job, worker="w", revoked=[stamped, bare], actor="revocation:w")
    work = await s.jobs.revocation_work("i-guard")
    # The stamped one was recorded revoked; the bare one is still live.
    assert {lease.lease_id: lease.state for lease in work.leases} == {bare: "active"}
