"""AdminRecords' listings for an incident: leases counted by group, instances and jobs a
page at a time (ties on the time broken by the id, so no row is skipped or shown twice),
and an instance's standing for ``policy explain``."""

from __future__ import annotations

from datetime import timedelta

from broker.leases import LIVE_LEASE_STATES, LeaseState
from tests.integration.leases.support import T0, complete, issue

LIVE = sorted(s.value for s in LIVE_LEASE_STATES)


async def _issue(s, instance, role, *, workload="w", issuer="dev", kind="k"):
    ticket = await s.issuance.begin_issue(
        instance_id=instance, issuer_name=issuer, workload=workload, role=role, kind=kind
    )
    return ticket.lease_id


async def test_leases_counted_by_each_group_largest_first(ledgers):
    s = await ledgers()
    for n, role in ((3, "db"), (1, "cert"), (2, "ssh")):
        for i in range(n):
            await _issue(s, f"i-{role}-{i}", role, workload=f"wl-{role}", kind=f"k-{role}",
                         issuer="dev" if role != "ssh" else "other")
    done = await _issue(s, "i-done", "db")
    await complete(s, done)
    await s.issuance.end_lease(done, LeaseState.RELEASED, "workload")  # no longer live

    groups = await s.admin.count_leases(group_by="role", states=LIVE, top=10)
    assert (groups.groups, groups.total, groups.group_count) == (
        (("db", 3), ("ssh", 2), ("cert", 1)), 6, 3)
    top = await s.admin.count_leases(group_by="engine", states=LIVE, top=2)
    assert (top.groups, top.total, top.group_count) == ((("k-db", 3), ("k-ssh", 2)), 6, 3)
    by_issuer = await s.admin.count_leases(group_by="issuer", states=LIVE, top=10)
    assert by_issuer.groups == (("dev", 4), ("other", 2))
    by_workload = await s.admin.count_leases(group_by="workload", states=["released"], top=10)
    assert (by_workload.groups, by_workload.total) == ((("w", 1),), 1)
    empty = await s.admin.count_leases(group_by="role", states=["expired"], top=10)
    assert (empty.groups, empty.total, empty.group_count) == ((), 0, 0)


async def test_instances_listed_filtered_and_paged_with_lease_counts(ledgers):
    s = await ledgers()
    ids = [f"i-{n:02d}" for n in range(7)]
    for n, instance in enumerate(ids):
        if n >= 4:
            ledgers.clock.advance(60)
        await _issue(s, instance, "r", workload="a" if n % 2 else "b")
    await _issue(s, "i-00", "r2", workload="b")
    await s.termination.request_termination("i-01", actor="operator:admin")

    pages, after = [], None
    for _ in range(10):
        page = await s.admin.list_instances(limit=3, after=after)
        pages.append([x.instance.instance_id for x in page])
        if len(page) < 3:
            break
        last = page[-1].instance
        after = (last.created_at, last.instance_id)
    assert [i for p in pages for i in p] == ids  # same-second ties in id order, none lost
    first = (await s.admin.list_instances(limit=1))[0]
    assert (first.instance.instance_id, first.leases) == ("i-00", {"issuing": 2})

    assert [x.instance.instance_id for x in await s.admin.list_instances(workload="a")] == [
        "i-01", "i-03", "i-05"]
    assert [x.instance.instance_id for x in await s.admin.list_instances(state="terminating")] \
        == ["i-01"]
    assert [x.instance.instance_id for x in await s.admin.list_instances(issuer="nope")] == []
    recent = await s.admin.list_instances(since=T0 + timedelta(seconds=30))
    assert [x.instance.instance_id for x in recent] == ids[4:]


async def test_jobs_paged_by_request_time_then_id(ledgers):
    s = await ledgers()
    jobs = []
    for n in range(5):
        if n == 3:
            ledgers.clock.advance(10)
        jobs.append((await s.termination.request_termination(f"i-j{n}", actor="operator:a")).job)
    # Within one instant the order is the job id's.
    expected = sorted(jobs[:3], key=lambda j: j.job_id) + sorted(jobs[3:], key=lambda j: j.job_id)
    seen, after = [], None
    for _ in range(10):
        page = await s.admin.list_jobs(limit=2, after=after)
        seen += page
        if len(page) < 2:
            break
        after = (page[-1].created_at, page[-1].job_id)
    assert [j.job_id for j in seen] == [j.job_id for j in expected]
    assert [j.instance_id for j in await s.admin.list_jobs(instance="i-j4")] == ["i-j4"]
    assert len(await s.admin.list_jobs(since=T0 + timedelta(seconds=5))) == 2
    assert len(await s.admin.list_jobs(state="pending", limit=1000)) == 5


async def test_instance_standing_without_its_leases(ledgers):
    s = await ledgers()
    assert await s.admin.instance_standing("i-never") is None
    await issue(s, "i-live")
    instance, job = await s.admin.instance_standing("i-live")
    assert (instance.state, job) == ("active", None)
    await s.termination.request_termination("i-live", actor="operator:alice")
    instance, job = await s.admin.instance_standing("i-live")
    assert (instance.state, job.requested_by, job.created_at) == (
        "terminating", "operator:alice", T0)
