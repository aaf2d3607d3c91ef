"""One suite that every store backend runs: SQLite and PostgreSQL, real databases."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta

import pytest

from broker.clock import FixedClock
from broker.errors import InstanceTerminated, NotFound
from broker.leases.db import migrate
from broker.leases.settings import StoreSettings
from broker.leases.states import LeaseState
from broker.leases.store import LeasesStillLive, Store

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
async def stores(request, pg, workdir):
    """A factory of Store objects on one fresh database (several = several replicas)."""
    if request.param == "sqlite":
        url = f"sqlite:///{workdir / ('suite-' + secrets.token_hex(6) + '.db')}"
        name = None
    else:
        name = await asyncio.to_thread(pg.create_database)
        url = pg.url(name)
    await asyncio.to_thread(migrate, url)
    clock = FixedClock(T0)
    opened: list[Store] = []

    async def make() -> Store:
        s = Store(StoreSettings(url=url), clock)
        await s.start()
        opened.append(s)
        return s

    make.clock = clock  # type: ignore[attr-defined]
    yield make
    for s in opened:
        await s.close()
    if name:
        await asyncio.to_thread(pg.drop_database, name)


async def _issue(store: Store, instance: str, role: str = "r") -> str:
    lease_id = await store.begin_issue(instance_id=instance, issuer_name="dev", workload="w",
                                       role=role, kind="k")
    return lease_id.lease_id


async def test_migrated_store_reports_its_revision(stores):
    s = await stores()
    assert await s.is_migrated()


async def test_issue_then_complete(stores):
    s = await stores()
    lease_id = await _issue(s, "i-1")
    lease = await s.get_lease(lease_id)
    assert (lease.state, lease.instance_id, lease.vault_lease_id) == ("issuing", "i-1", None)
    await s.record_token(instance_id="i-1", accessor="acc-1", expires_at=T0 + timedelta(hours=1))
    ok = await s.complete_issue(lease_id, vault_lease_id="db/creds/r/abc", accessor="acc-1",
                                renewable=True, issued_at=T0, expires_at=T0 + timedelta(minutes=5))
    assert ok is True
    lease = await s.get_lease(lease_id)
    assert (lease.state, lease.vault_lease_id, lease.token_accessor, lease.renewable) == (
        "active", "db/creds/r/abc", "acc-1", True)
    assert lease.expires_at == T0 + timedelta(minutes=5)
    with pytest.raises(NotFound):
        await s.get_lease("l-" + "0" * 32)


async def test_termination_is_idempotent_and_tombstones(stores):
    s = await stores()
    lease_id = await _issue(s, "i-2")
    job1 = await s.request_termination("i-2", actor="admin")
    job2 = await s.request_termination("i-2", actor="admin")
    assert job1.job_id == job2.job_id and job1.state == "pending"
    with pytest.raises(InstanceTerminated):
        await _issue(s, "i-2")
    with pytest.raises(InstanceTerminated):
        await s.record_token(instance_id="i-2", accessor="acc-x", expires_at=T0)
    # A request that was in flight when the instance was tombstoned records its lease (so
    # the job revokes it) but is told not to hand the credential out.
    still_active = await s.complete_issue(lease_id, vault_lease_id="v/1", accessor="a",
                                          renewable=False, issued_at=T0, expires_at=T0)
    assert still_active is False
    work = await s.revocation_work("i-2")
    assert [x.lease_id for x in work.leases] == [lease_id]


async def test_two_replicas_claim_disjoint_jobs(stores):
    a, b = await stores(), await stores()
    for i in range(20):
        await a.request_termination(f"i-{i}", actor="admin")
    got_a, got_b = await asyncio.gather(
        a.claim_jobs(worker="A", limit=15, claim_for=timedelta(seconds=60)),
        b.claim_jobs(worker="B", limit=15, claim_for=timedelta(seconds=60)))
    ids_a, ids_b = {j.job_id for j in got_a}, {j.job_id for j in got_b}
    assert not ids_a & ids_b
    rest = await a.claim_jobs(worker="A", limit=50, claim_for=timedelta(seconds=60))
    assert len(ids_a) + len(ids_b) + len(rest) == 20
    assert all(j.state == "running" and j.attempts == 1 for j in got_a + got_b + rest)


async def test_a_lapsed_claim_is_taken_over_and_the_old_worker_cannot_finish(stores):
    s = await stores()
    await s.request_termination("i-lapse", actor="admin")
    [job] = await s.claim_jobs(worker="dead", limit=5, claim_for=timedelta(seconds=30))
    assert await s.claim_jobs(worker="new", limit=5, claim_for=timedelta(seconds=30)) == []
    stores.clock.advance(31)
    [again] = await s.claim_jobs(worker="new", limit=5, claim_for=timedelta(seconds=30))
    assert again.job_id == job.job_id and again.attempts == 2
    assert await s.finish_job(job, worker="dead") is False
    assert await s.finish_job(again, worker="new") is True
    instance, _, shown = await s.get_instance("i-lapse")
    assert (instance.state, shown.state) == ("terminated", "done")


async def test_a_job_that_gives_up_stays_visible_and_can_be_requeued(stores):
    s = await stores()
    await s.request_termination("i-fail", actor="admin")
    [job] = await s.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))
    await s.reschedule_job(job, worker="w", error="vault_unavailable",
                           next_attempt_at=T0 + timedelta(seconds=5), give_up=True)
    [failed] = await s.list_jobs(state="failed")
    assert (failed.job_id, failed.last_error) == (job.job_id, "vault_unavailable")
    stores.clock.advance(3600)
    assert await s.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30)) == []
    counts = await s.counts()
    assert counts.failed_jobs == 1 and counts.queue_depth == 0
    requeued = await s.request_termination("i-fail", actor="admin")
    assert (requeued.state, requeued.attempts) == ("pending", 0)
    [claimed] = await s.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))
    assert claimed.job_id == job.job_id


async def test_retry_is_not_claimed_before_its_time(stores):
    s = await stores()
    await s.request_termination("i-later", actor="admin")
    [job] = await s.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))
    await s.reschedule_job(job, worker="w", error="x", next_attempt_at=T0 + timedelta(seconds=10),
                           give_up=False)
    assert await s.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30)) == []
    stores.clock.advance(11)
    assert len(await s.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))) == 1


async def _complete(store: Store, lease_id: str, n: int) -> None:
    await store.complete_issue(lease_id, vault_lease_id=f"v/{lease_id}", accessor="acc",
                               renewable=True, issued_at=T0, expires_at=T0)


async def test_end_lease_and_bulk_mark_follow_the_state_machine(stores):
    s = await stores()
    ids = [await _issue(s, "i-bulk") for _ in range(3)]
    for n, lease_id in enumerate(ids[:2]):
        await _complete(s, lease_id, n)
    # An issuing lease cannot be released; an active one can, once.
    assert await s.end_lease(ids[2], LeaseState.RELEASED, actor="workload") is False
    assert await s.end_lease(ids[0], LeaseState.RELEASED, actor="workload") is True
    assert await s.end_lease(ids[0], LeaseState.RELEASED, actor="workload") is False
    # Revoked only from active; abandoned only from issuing — never over an active lease.
    assert await s.mark_leases_ended(ids, LeaseState.ABANDONED, actor="w") == 1
    assert await s.mark_leases_ended(ids, LeaseState.REVOKED, actor="w") == 1
    states = {x.lease_id: x.state for x in await s.list_leases(instance="i-bulk")}
    assert states == {ids[0]: "released", ids[1]: "revoked", ids[2]: "abandoned"}


async def test_a_job_cannot_finish_while_a_lease_is_live(stores):
    s = await stores()
    lease_id = await _issue(s, "i-live")
    await s.request_termination("i-live", actor="admin")
    [job] = await s.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))
    with pytest.raises(LeasesStillLive):
        await s.finish_job(job, worker="w")
    await s.complete_issue(lease_id, vault_lease_id="v/live", accessor="a", renewable=False,
                           issued_at=T0, expires_at=T0)  # completes after termination
    with pytest.raises(LeasesStillLive):
        await s.finish_job(job, worker="w")
    await s.mark_leases_ended([lease_id], LeaseState.REVOKED, actor="w")
    assert await s.finish_job(job, worker="w") is True


async def test_a_pass_that_only_waited_is_not_an_attempt(stores):
    s = await stores()
    await s.request_termination("i-wait", actor="admin")
    for _ in range(5):
        [job] = await s.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))
        await s.reschedule_job(job, worker="w", error="revocation_waiting",
                               next_attempt_at=T0, give_up=False, count_attempt=False)
    [job] = await s.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))
    assert job.attempts == 1


async def test_list_filters_and_pagination(stores):
    s = await stores()
    made = sorted([await _issue(s, "i-p1", "r1"), await _issue(s, "i-p1", "r2"),
                   await _issue(s, "i-p2", "r1")])
    assert {x.lease_id for x in await s.list_leases(role="r1")} == {
        x.lease_id for x in await s.list_leases() if x.role == "r1"}
    page1 = await s.list_leases(limit=2)
    page2 = await s.list_leases(limit=2, after=page1[-1].lease_id)
    assert [x.lease_id for x in page1 + page2] == made
    assert await s.list_leases(instance="nope") == []
    assert [x.state for x in await s.list_leases(state="issuing")] == ["issuing"] * 3


async def test_token_ids_are_refused_twice_and_forgotten_after_expiry(stores):
    from broker.errors import TokenInvalid

    s = await stores()
    await s.begin_issue(instance_id="i-jti", issuer_name="dev", workload="w", role="r",
                        kind="k", token_id=("jti-1", T0 + timedelta(minutes=5)))
    with pytest.raises(TokenInvalid) as replay:
        await s.begin_issue(instance_id="i-jti", issuer_name="dev", workload="w", role="r",
                            kind="k", token_id=("jti-1", T0 + timedelta(minutes=5)))
    assert replay.value.code == "token_replayed"
    # The same id from another issuer is another token.
    await s.begin_issue(instance_id="i-jti2", issuer_name="other", workload="w", role="r",
                        kind="k", token_id=("jti-1", T0 + timedelta(minutes=5)))
    assert len(await s.list_leases()) == 2  # the replay wrote no lease
    assert await s.prune_seen_tokens(grace=timedelta(seconds=60)) == 0
    stores.clock.advance(5 * 60 + 61)
    assert await s.prune_seen_tokens(grace=timedelta(seconds=60)) == 2


async def test_an_instance_id_belongs_to_one_issuer_and_one_workload(stores):
    from broker.errors import NotPermitted

    s = await stores()
    await _issue(s, "i-own")  # issuer dev, workload w
    with pytest.raises(NotPermitted) as other_issuer:
        await s.begin_issue(instance_id="i-own", issuer_name="other", workload="w", role="r",
                            kind="k")
    assert other_issuer.value.code == "instance_issuer_mismatch"
    with pytest.raises(NotPermitted) as other_workload:
        await s.begin_issue(instance_id="i-own", issuer_name="dev", workload="w2", role="r",
                            kind="k")
    assert other_workload.value.code == "instance_workload_mismatch"
    assert len(await s.list_leases(instance="i-own")) == 1


async def test_an_expired_lease_holds_no_slot_under_the_limit(stores):
    from broker.errors import LeaseLimitReached
    from broker.leases.store import LeaseLimit

    s = await stores()
    limit = LeaseLimit(1, "refuse")
    first = await s.begin_issue(instance_id="i-exp", issuer_name="dev", workload="w",
                                role="r", kind="k", limit=limit)
    await s.complete_issue(first.lease_id, vault_lease_id="v/exp-1", accessor="a",
                           renewable=False, issued_at=T0, expires_at=T0 + timedelta(minutes=1))
    with pytest.raises(LeaseLimitReached):
        await s.begin_issue(instance_id="i-exp", issuer_name="dev", workload="w", role="r",
                            kind="k", limit=limit)
    stores.clock.advance(120)  # the credential expired: Vault holds nothing for it
    second = await s.begin_issue(instance_id="i-exp", issuer_name="dev", workload="w",
                                 role="r", kind="k", limit=limit)
    assert second.superseded == ()
    # The expired row stays active, for termination to settle.
    assert (await s.get_lease(first.lease_id)).state == "active"


async def test_replacing_stops_while_replaced_leases_are_unconfirmed(stores):
    from broker.errors import LeaseLimitReached
    from broker.leases.store import LeaseLimit

    s = await stores()
    limit = LeaseLimit(1, "revoke_oldest")
    ids = []
    for n in range(2):
        ticket = await s.begin_issue(instance_id="i-stuck", issuer_name="dev", workload="w",
                                     role="r", kind="k", limit=limit)
        await s.complete_issue(ticket.lease_id, vault_lease_id=f"v/stuck-{n}", accessor="a",
                               renewable=False, issued_at=T0,
                               expires_at=T0 + timedelta(hours=1))
        ids.append(ticket)
    assert ids[1].superseded == ((ids[0].lease_id, "v/stuck-0"),)
    # The first replaced lease is never confirmed revoked (Vault keeps failing): a third
    # request would leave two live leases behind a limit of one, so it is refused.
    with pytest.raises(LeaseLimitReached) as err:
        await s.begin_issue(instance_id="i-stuck", issuer_name="dev", workload="w", role="r",
                            kind="k", limit=limit)
    assert "not confirmed revoked" in err.value.message
    assert [lv.state for lv in await s.list_leases() if lv.instance_id == "i-stuck"].count(
        "active") == 1


# -- reconciliation, sources and liveness (issue 5) -------------------------------------


async def test_a_source_for_one_issuer_cannot_end_another_issuers_instance(stores):
    from broker.errors import NotPermitted

    s = await stores()
    await _issue(s, "i-owned")  # issuer "dev"
    with pytest.raises(NotPermitted) as info:
        await s.request_termination("i-owned", actor="events:sqs", issuer="aws")
    assert info.value.code == "instance_issuer_mismatch"
    assert (await s.instance_state("i-owned")) == ("active", "dev")
    assert await s.list_jobs() == []
    job = await s.request_termination("i-owned", actor="events:sqs", issuer="dev")
    assert job.requested_by == "events:sqs"
    # One the broker never saw is tombstoned for the source's issuer.
    await s.request_termination("i-unknown", actor="events:sqs", issuer="aws")
    assert (await s.instance_state("i-unknown")) == ("terminating", "aws")
    assert await s.active_instance_ids("dev") == set()


async def test_active_instance_ids_by_issuer(stores):
    s = await stores()
    for iid in ("i-a", "i-b", "i-c"):
        await _issue(s, iid)
    await s.request_termination("i-b", actor="admin")
    assert await s.active_instance_ids("dev") == {"i-a", "i-c"}
    assert await s.active_instance_ids("other") == set()


async def test_past_expiry_stuck_and_settle(stores):
    s = await stores()
    clock = stores.clock
    stuck = await _issue(s, "i-x")
    live = await _issue(s, "i-x")
    await s.complete_issue(live, vault_lease_id="db/creds/r/live", accessor="acc",
                           renewable=True, issued_at=T0, expires_at=T0 + timedelta(minutes=5))
    assert await s.past_expiry(before=T0 + timedelta(minutes=4), limit=10) == []
    [past] = await s.past_expiry(before=T0 + timedelta(minutes=6), limit=10)
    assert past.lease_id == live
    await s.correct_expiry(live, T0 + timedelta(hours=1))
    assert await s.past_expiry(before=T0 + timedelta(minutes=6), limit=10) == []

    assert await s.stuck_issuing(created_before=T0, limit=10) == []
    clock.advance(10)
    [(row, instance_state)] = await s.stuck_issuing(created_before=clock.now(), limit=10)
    assert (row.lease_id, instance_state) == (stuck, "active")
    assert await s.settle_stuck(stuck, revoked=["db/creds/r/lost"], actor="reconciler")
    assert not await s.settle_stuck(stuck, revoked=[], actor="reconciler")  # once
    lease = await s.get_lease(stuck)
    assert lease.state == "abandoned"
    [event] = [e for e in await s.audit_events("i-x") if e["action"] == "lease.stuck_settled"]
    assert event["detail"] == {"revoked_in_vault": 1, "vault_lease_ids": ["db/creds/r/lost"]}
    assert await s.vault_lease_states(["db/creds/r/live", "db/creds/r/none"]) == {
        "db/creds/r/live": "active"}


async def test_sightings_and_unseen_instances(stores):
    s = await stores()
    clock = stores.clock
    await _issue(s, "i-old")
    await _issue(s, "i-new")
    clock.advance(3600)
    await s.mark_seen(["i-new"], clock.now())
    await s.mark_seen(["i-new"], T0)  # an older sighting never moves it back
    assert await s.unseen_instances("dev", seen_before=clock.now() - timedelta(minutes=30),
                                    limit=10) == ["i-old"]
    assert await s.unseen_instances("other", seen_before=clock.now(), limit=10) == []


async def test_use_once_and_retry_job(stores):
    from broker.errors import BadRequest

    s = await stores()
    assert await s.use_once("@event-webhook", "ab" * 32, keep_until=T0 + timedelta(minutes=5))
    assert not await s.use_once("@event-webhook", "ab" * 32, keep_until=T0)
    assert await s.is_used("@event-webhook", "ab" * 32)
    assert not await s.is_used("dev", "ab" * 32)  # namespaces are apart

    job = await s.request_termination("i-retry", actor="admin")
    with pytest.raises(BadRequest):
        await s.retry_job(job.job_id, actor="admin")
    [claimed] = await s.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=30))
    await s.reschedule_job(claimed, worker="w", error="vault_unavailable",
                           next_attempt_at=T0, give_up=True)
    again = await s.retry_job(job.job_id, actor="admin")
    assert (again.state, again.attempts) == ("pending", 0)
    with pytest.raises(NotFound):
        await s.retry_job("j-" + "0" * 32, actor="admin")


async def test_a_request_past_the_issuing_bound_cannot_record_its_lease(stores):
    from broker.errors import StoreUnavailable

    s = await stores()
    lease_id = await _issue(s, "i-late")
    with pytest.raises(StoreUnavailable) as info:
        await s.complete_issue(lease_id, vault_lease_id="db/creds/r/late", accessor="acc",
                               renewable=False, issued_at=T0, expires_at=T0 + timedelta(minutes=5),
                               created_after=T0 + timedelta(seconds=1))
    assert info.value.code == "lease_state_conflict"
    assert (await s.get_lease(lease_id)).state == "issuing"
    assert await s.complete_issue(lease_id, vault_lease_id="db/creds/r/late", accessor="acc",
                                  renewable=False, issued_at=T0,
                                  expires_at=T0 + timedelta(minutes=5),
                                  created_after=T0 - timedelta(seconds=1))
