"""AdminRecords: listings, and the retry of a failed job."""

from __future__ import annotations

from datetime import timedelta

import pytest

from broker.errors import BadRequest, NotFound
from tests.integration.leases.support import T0, issue


async def test_list_filters_and_pagination(ledgers):
    s = await ledgers()
    made = sorted(
        [await issue(s, "i-p1", "r1"), await issue(s, "i-p1", "r2"), await issue(s, "i-p2", "r1")]
    )
    assert {x.lease_id for x in await s.admin.list_leases(role="r1")} == {
        x.lease_id for x in await s.admin.list_leases() if x.role == "r1"
    }
    page1 = await s.admin.list_leases(limit=2)
    page2 = await s.admin.list_leases(limit=2, after=page1[-1].lease_id)
    assert [x.lease_id for x in page1 + page2] == made
    assert await s.admin.list_leases(instance="nope") == []
    assert [x.state for x in await s.admin.list_leases(state="issuing")] == ["issuing"] * 3


async def test_only_a_failed_job_is_retried(ledgers):
    s = await ledgers()
    job = (await s.termination.request_termination("i-retry", actor="admin")).job
    with pytest.raises(BadRequest):
        await s.admin.retry_job(job.job_id, actor="admin")
    [claimed] = await s.jobs.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))
    await s.jobs.reschedule_job(
        claimed, worker="w", error="vault_unavailable", next_attempt_at=T0, give_up=True
    )
    again = await s.admin.retry_job(job.job_id, actor="admin")
    assert (again.state, again.attempts) == ("pending", 0)
    with pytest.raises(NotFound):
        await s.admin.retry_job("j-" + "0" * 32, actor="admin")
