"""TerminationRecords: the tombstone and its job, and which instances are active."""

from __future__ import annotations

import pytest

from broker.errors import InstanceTerminated
from tests.integration.leases.support import T0, issue


async def test_termination_is_idempotent_and_tombstones(ledgers):
    s = await ledgers()
    lease_id = await issue(s, "i-2")
    job1 = (await s.termination.request_termination("i-2", actor="admin")).job
    job2 = (await s.termination.request_termination("i-2", actor="admin")).job
    assert job1.job_id == job2.job_id and job1.state == "pending"
    with pytest.raises(InstanceTerminated):
        await issue(s, "i-2")
    with pytest.raises(InstanceTerminated):
        await s.issuance.record_token(instance_id="i-2", accessor="acc-x", expires_at=T0)
    # A request that was in flight when the instance was tombstoned records its lease (so
    # the job revokes it) but is told not to hand the credential out.
    still_active = await s.issuance.complete_issue(
        lease_id, vault_lease_id="v/1", accessor="a", renewable=False, issued_at=T0, expires_at=T0
    )
    assert still_active is False
    work = await s.jobs.revocation_work("i-2")
    assert [x.lease_id for x in work.leases] == [lease_id]


async def test_a_source_for_one_issuer_cannot_end_another_issuers_instance(ledgers):
    from broker.errors import NotPermitted

    s = await ledgers()
    await issue(s, "i-owned")  # issuer "dev"
    with pytest.raises(NotPermitted) as info:
        await s.termination.request_termination("i-owned", actor="events:sqs", issuer="aws")
    assert info.value.code == "instance_issuer_mismatch"
    assert (await s.issuance.instance_state("i-owned")) == ("active", "dev")
    assert await s.admin.list_jobs() == []
    job = (await s.termination.request_termination("i-owned", actor="events:sqs", issuer="dev")).job
    assert job.requested_by == "events:sqs"
    # One the broker never saw is tombstoned for the source's issuer.
    await s.termination.request_termination("i-unknown", actor="events:sqs", issuer="aws")
    assert (await s.issuance.instance_state("i-unknown")) == ("terminating", "aws")
    assert await s.termination.active_instance_ids("dev") == set()


async def test_active_instance_ids_by_issuer(ledgers):
    s = await ledgers()
    for iid in ("i-a", "i-b", "i-c"):
        await issue(s, iid)
    await s.termination.request_termination("i-b", actor="admin")
    assert await s.termination.active_instance_ids("dev") == {"i-a", "i-c"}
    assert await s.termination.active_instance_ids("other") == set()


async def test_self_termination_is_said_by_the_caller_not_by_a_token_id(ledgers):
    """Finding 8b: an issuer without a jti replay rule uses no token id, and the event said
    self_terminated False; the caller says it now."""
    from tests.integration.leases.support import audit_events

    s = await ledgers()
    await issue(s, "i-self")
    await issue(s, "i-admin")
    await s.termination.request_termination("i-self", actor="workload:dev", issuer="dev",
                                            workload="w", self_terminated=True)
    await s.termination.request_termination("i-admin", actor="operator:alice")
    said = {}
    for iid in ("i-self", "i-admin"):
        [event] = [e for e in await audit_events(s, iid)
                   if e["action"] == "instance.terminate_requested"]
        said[iid] = event["detail"]["self_terminated"]
    assert said == {"i-self": True, "i-admin": False}
