"""PostgreSQL's one-round-trip issuance, termination and job's end
(``broker.leases.sql.onetrip``) against the general path each stands in for: the same
rows and the same audit events for the common case, the general path's own answer (and
nothing written) for every other case, and the instance lock they wait on."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import asdict, replace
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy import select, text

from broker.audit.service import AuditVerification
from broker.clock import FixedClock
from broker.errors import InstanceTerminated, LeaseLimitReached, Locked, NotPermitted, TokenInvalid
from broker.leases import Database, IssuingRow, LeaseLimit, LeasesStillLive, LeaseState, Ledgers
from broker.leases import models as m
from broker.leases.database import GeneralCase, OneTrip
from broker.leases.locks import LockSubject
from broker.leases.migrations import migrate
from broker.leases.settings import StoreSettings
from broker.leases.sql import jobs, onetrip, revocation
from broker.leases.sql.common import INSTANCE_LOCK_CLASS
from tests.harness.wait import eventually
from tests.integration.leases.support import T0

ROLE, KIND = "db", "database"


@pytest.fixture
async def pair(pg):
    """Ledgers on one fresh PostgreSQL database: (one round trip, general path only)."""
    name = await asyncio.to_thread(pg.create_database)
    url = pg.url(name)
    await asyncio.to_thread(migrate, url)
    clock = FixedClock(T0)
    opened = []
    for one_trip in (True, False):
        db = Database(StoreSettings(url=url, one_round_trip=one_trip))
        await db.start()
        opened.append(Ledgers.on(db, clock, token_key=b"k" * 32))
    assert opened[0].database.one_trip is not None and opened[1].database.one_trip is None
    yield opened[0], opened[1]
    for s in opened:
        await s.database.close()
    await asyncio.to_thread(pg.drop_database, name)


def _instance() -> str:
    return "i-" + secrets.token_hex(4)


async def _begin(s: Ledgers, instance: str, **overrides: Any):
    args: dict[str, Any] = {
        "instance_id": instance,
        "issuer_name": "dev",
        "workload": "w",
        "role": ROLE,
        "kind": KIND,
        "token_id": ("jti-" + secrets.token_hex(4), T0 + timedelta(minutes=5)),
        "limit": LeaseLimit(3, "revoke_oldest"),
        "external_ref": {"session": "s-1"},
        "vault_path": "database/creds/db",
        "claims": {"sub": "system:serviceaccount:ns:w"},
    }
    return await s.issuance.begin_issue(**(args | overrides))


async def _complete(s: Ledgers, ticket, vault_lease_id: str) -> bool:
    return await s.issuance.complete_issue(
        ticket.lease_id,
        vault_lease_id=vault_lease_id,
        accessor="acc-1",
        renewable=True,
        issued_at=T0,
        expires_at=T0 + timedelta(minutes=10),
        created_after=T0 - timedelta(minutes=2),
        engine="database",
        token_id=("dev", "jti-x"),
        credential_ref={"username": "v-user"},
        issuing=ticket.issuing,
    )


async def _rows(s: Ledgers, model: Any, where: Any) -> list[dict[str, Any]]:
    async with s.database.transaction(readonly=True) as conn:
        return [dict(r._mapping) for r in (await conn.execute(select(model).where(where))).all()]


def _without(row: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in keys}


async def _story(s: Ledgers, instance: str) -> dict[str, Any]:
    """What one issuance left in the store, with its ids taken out."""
    lease = (await _rows(s, m.Lease, m.Lease.instance_id == instance))[0]
    row = (await _rows(s, m.Instance, m.Instance.instance_id == instance))[0]
    events = await _rows(s, m.AuditEvent, m.AuditEvent.instance_id == instance)
    return {
        "lease": _without(lease, "lease_id", "instance_id", "vault_lease_id"),
        "instance": _without(row, "instance_id"),
        "events": [
            {
                **_without(e, "id", "seq", "prev_hash", "hash", "instance_id", "lease_id"),
                "detail": _without(e["detail"], "vault_lease_id"),
            }
            for e in events
        ],
    }


async def test_the_common_case_leaves_what_the_general_path_leaves(pair):
    fast, general = pair
    for s in (fast, general, fast):  # the chain runs on across both paths
        instance = _instance()
        ticket = await _begin(s, instance)
        assert ticket.issuing == IssuingRow(instance, "dev", "w", ROLE, KIND)
        assert await _complete(s, ticket, f"database/creds/db/{instance}") is True
    one, other = _instance(), _instance()
    for s, instance in ((fast, one), (general, other)):
        ticket = await _begin(s, instance)
        await s.issuance.record_token(
            instance_id=instance, accessor=f"acc-{instance}", expires_at=T0 + timedelta(hours=1)
        )
        await _complete(s, ticket, f"database/creds/db/{instance}")
    assert await _story(fast, one) == await _story(general, other)
    tokens = [
        _without(row, "accessor", "instance_id")
        for s, instance in ((fast, one), (general, other))
        for row in await _rows(s, m.InstanceToken, m.InstanceToken.instance_id == instance)
    ]
    assert len(tokens) == 2 and tokens[0] == tokens[1]
    assert (await _story(fast, one))["events"][0]["outcome"] == "ok"
    report = await AuditVerification(fast.chain).verify()
    assert report.ok and report.events == 7, report.findings


async def test_an_instance_terminated_while_vault_was_asked_is_withheld_alike(pair):
    fast, general = pair
    stories = []
    for s in (fast, general):
        instance = _instance()
        ticket = await _begin(s, instance)
        await s.termination.request_termination(instance, actor="operator:o", issuer="dev")
        assert await _complete(s, ticket, f"database/creds/db/{instance}") is False
        story = await _story(s, instance)
        issued = [e for e in story["events"] if e["action"] == "lease.issued"]
        assert [(e["outcome"], e["reason"]) for e in issued] == [
            ("withheld", "instance terminated while the credential was issued")
        ]
        stories.append(story["lease"])
    assert stories[0] == stories[1]


@pytest.mark.parametrize(
    "case",
    ["locked", "replayed", "other_issuer", "other_workload", "terminated", "limit_refused"],
)
async def test_every_other_case_gets_the_general_paths_answer_and_writes_nothing(pair, case):
    fast, _ = pair
    instance = _instance()
    overrides: dict[str, Any] = {}
    expected: type[Exception]
    if case == "locked":
        await fast.admin.create_lock(
            kind="workload",
            value="w",
            claim=None,
            reason="incident",
            incident=None,
            expires_at=None,
            actor="operator:o",
        )
        overrides["lock_subject"] = LockSubject(issuer="dev", workload="w", role=ROLE, claims={})
        expected = Locked
    elif case == "replayed":
        overrides["token_id"] = ("jti-reused", T0 + timedelta(minutes=5))
        await _begin(fast, _instance(), token_id=overrides["token_id"])
        expected = TokenInvalid
    elif case in ("other_issuer", "other_workload"):
        await _begin(fast, instance)
        overrides = {"issuer_name": "other"} if case == "other_issuer" else {"workload": "w2"}
        expected = NotPermitted
    elif case == "terminated":
        await fast.termination.request_termination(instance, actor="operator:o", issuer="dev")
        expected = InstanceTerminated
    else:
        overrides["limit"] = LeaseLimit(1, "refuse")
        await _begin(fast, instance, limit=overrides["limit"])
        expected = LeaseLimitReached
    before = await _counts(fast)
    with pytest.raises(expected):
        await _begin(fast, instance, **overrides)
    assert await _counts(fast) == before


async def test_a_token_for_a_terminated_instance_is_refused_and_not_recorded(pair):
    fast, _ = pair
    instance = _instance()
    await _begin(fast, instance)
    await fast.termination.request_termination(instance, actor="operator:o", issuer="dev")
    before = await _counts(fast)
    with pytest.raises(InstanceTerminated):
        await fast.issuance.record_token(
            instance_id=instance, accessor="acc-late", expires_at=T0 + timedelta(hours=1)
        )
    assert await _counts(fast) == before


async def test_a_full_instance_supersedes_its_oldest_lease_through_the_general_path(pair):
    fast, _ = pair
    instance = _instance()
    tickets = []
    for n in range(3):
        ticket = await _begin(fast, instance)
        await _complete(fast, ticket, f"database/creds/db/{instance}-{n}")
        tickets.append(ticket)
    fourth = await _begin(fast, instance)
    # One of the three (they share the fixed clock's instant; ties go by lease id).
    assert len(fourth.superseded) == 1
    assert fourth.superseded[0][0] in {t.lease_id for t in tickets}


async def _counts(s: Ledgers) -> tuple[int, ...]:
    async with s.database.transaction(readonly=True) as conn:
        counts = []
        for table in (
            "instances",
            "leases",
            "seen_tokens",
            "instance_tokens",
            "audit_events",
            "revocation_jobs",
        ):
            query = text(f"SELECT count(*) FROM {table}")  # noqa: S608 - our own names
            counts.append((await conn.execute(query)).scalar_one())
        return tuple(counts)


async def _waiting_for_instance_lock(s: Ledgers) -> bool:
    async with s.database.transaction(readonly=True) as conn:
        waiting = await conn.execute(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND classid = CAST(CAST(:c AS bigint) AS oid)"
            ),
            {"c": INSTANCE_LOCK_CLASS},
        )
        return bool(waiting.scalar_one())


async def test_termination_waits_for_an_issuance_in_flight_and_then_sees_its_row(pair):
    fast, general = pair
    instance = _instance()
    await _begin(fast, instance)
    # An issuance holding the instance's shared lock (its transaction not yet committed).
    async with general.database.transaction() as conn:
        await conn.execute(
            text("SELECT pg_advisory_xact_lock_shared(:c, hashtext(:i))"),
            {"c": INSTANCE_LOCK_CLASS, "i": instance},
        )
        ending = asyncio.create_task(
            fast.termination.request_termination(instance, actor="operator:o", issuer="dev")
        )
        await eventually(lambda: _waiting_for_instance_lock(fast), "termination waits")
        assert not ending.done()
    termination = await ending
    assert termination.job.instance_id == instance


async def test_an_issuance_waits_for_a_termination_in_flight_and_is_then_refused(pair):
    fast, general = pair
    instance = _instance()
    await _begin(fast, instance)
    # A termination holding the instance's lock (its transaction not yet committed).
    async with general.database.transaction() as conn:
        await jobs.request_termination(
            conn, FixedClock(T0), instance, actor="operator:o", issuer="dev"
        )
        issuing = asyncio.create_task(_begin(fast, instance, limit=None))
        await eventually(lambda: _waiting_for_instance_lock(fast), "issuance waits")
        assert not issuing.done()
    with pytest.raises(InstanceTerminated):
        await issuing


async def test_a_first_issuance_waits_for_the_termination_of_an_id_never_seen(pair):
    """The lock before the instance row: a termination of an id never seen holds the lock
    and then writes the row; an issuance that wrote the row first would deadlock with it."""
    fast, general = pair
    instance = _instance()
    async with general.database.transaction() as conn:
        await conn.execute(
            text("SELECT pg_advisory_xact_lock(:c, hashtext(:i))"),
            {"c": INSTANCE_LOCK_CLASS, "i": instance},
        )
        issuing = asyncio.create_task(_begin(fast, instance, limit=None))
        await eventually(lambda: _waiting_for_instance_lock(fast), "issuance waits")
        # The row is written only now, under the lock the issuance is waiting for.
        await jobs.request_termination(
            conn, FixedClock(T0), instance, actor="operator:o", issuer="dev"
        )
    with pytest.raises(InstanceTerminated):
        await issuing
    assert not await _rows(fast, m.Lease, m.Lease.instance_id == instance)


async def test_a_completion_for_another_row_than_its_ticket_is_refused_by_the_general_path(
    pair,
):
    fast, _ = pair
    instance = _instance()
    ticket = await _begin(fast, instance)
    wrong = replace(ticket, issuing=replace(ticket.issuing, role="other-role"))
    assert await _complete(fast, wrong, f"database/creds/db/{instance}") is True
    events = await _rows(fast, m.AuditEvent, m.AuditEvent.instance_id == instance)
    # The general path wrote the event from the row itself, not from the ticket.
    assert [e["detail"]["role"] for e in events if e["action"] == "lease.issued"] == [ROLE]


async def test_closing_cuts_a_statement_still_running_instead_of_waiting_for_it(pg):
    """``Pool.close`` alone would wait for the statement (an hour here): shutdown waits at
    most the acquire bound, then cuts the connection."""
    pool = await asyncpg.create_pool(pg.url("postgres"), min_size=1)
    one_trip = OneTrip(pool, acquire_timeout_s=0.5)
    stuck = asyncio.create_task(one_trip.fetchval("SELECT pg_sleep(3600)"))
    await eventually(lambda: pool.get_idle_size() == 0 and pool.get_size() == 1, "running")
    await one_trip.close()
    with pytest.raises(Exception):  # noqa: B017 — cut: whichever error the driver gives
        await stuck
    assert pool.is_closing()


# A termination in one round trip (migration 0010) against the general path.


async def _ended(s: Ledgers, instance: str) -> dict[str, Any]:
    """What a termination left in the store, with its ids taken out."""
    row = (await _rows(s, m.Instance, m.Instance.instance_id == instance))[0]
    job = (await _rows(s, m.RevocationJob, m.RevocationJob.instance_id == instance))[0]
    events = await _rows(s, m.AuditEvent, m.AuditEvent.instance_id == instance)
    return {
        "instance": _without(row, "instance_id"),
        "job": _without(job, "job_id", "instance_id"),
        "events": [
            {
                **_without(e, "id", "seq", "prev_hash", "hash", "instance_id", "lease_id"),
                "detail": _without(e["detail"], "job_id", "vault_lease_id"),
            }
            for e in events
            if e["action"] == "instance.terminate_requested"
        ],
    }


def _general_path_only_for(general: bool, monkeypatch: Any, module: Any, name: str) -> None:
    """The one-round-trip ledger must serve the case alone: its general path's step fails
    the test if it runs; the general ledger gets it back."""
    if general:
        monkeypatch.undo()
        return

    async def not_here(*_: Any, **__: Any) -> None:
        raise AssertionError("the general path ran")

    monkeypatch.setattr(module, name, not_here)


@pytest.mark.parametrize("how", ["operator", "self"])
async def test_a_termination_leaves_what_the_general_path_leaves(pair, how, monkeypatch):
    fast, general = pair
    stories = []
    for s in (fast, general):
        _general_path_only_for(s is general, monkeypatch, jobs, "request_termination")
        instance = _instance()
        ticket = await _begin(s, instance)
        await _complete(s, ticket, f"database/creds/db/{instance}")
        said: dict[str, Any] = {"reason": "r" * 250, "incident": "INC-7"}
        if how == "self":
            said = {
                "issuer": "dev",
                "workload": "w",
                "token_id": ("jti-end-" + instance, T0 + timedelta(minutes=5)),
                "self_terminated": True,
            }
        termination = await s.termination.request_termination(instance, actor="a" * 80, **said)
        assert termination.never_seen is False
        story = await _ended(s, instance)
        # The answer is the row as stored (the fast path builds it without reading it).
        stored = (await _rows(s, m.RevocationJob, m.RevocationJob.instance_id == instance))[0]
        unviewed = ("claimed_by", "claimed_until", "updated_at")
        assert asdict(termination.job) == {k: v for k, v in stored.items() if k not in unviewed}
        if how == "self":
            seen = await _rows(s, m.SeenToken, m.SeenToken.jti == "jti-end-" + instance)
            assert [r["issuer_name"] for r in seen] == ["dev"]
        stories.append(story)
    assert stories[0] == stories[1]
    assert len(stories[0]["events"]) == 1 and stories[0]["job"]["state"] == "pending"
    report = await AuditVerification(fast.chain).verify()
    assert report.ok, report.findings


async def _set_up(s: Ledgers, case: str, instance: str) -> dict[str, Any]:
    """The case's store, and what the termination is asked with."""
    ask: dict[str, Any] = {"actor": "operator:o"}
    if case != "never_seen":
        await _begin(s, instance)
    if case == "terminating":
        await s.termination.request_termination(instance, actor="operator:first")
    elif case == "failed":
        await s.termination.request_termination(instance, actor="operator:first")
        async with s.database.transaction() as conn:
            await conn.execute(
                text("UPDATE revocation_jobs SET state = 'failed' WHERE instance_id = :i"),
                {"i": instance},
            )
    elif case == "other_issuer":
        ask["issuer"] = "other"
    elif case == "other_workload":
        ask.update(issuer="dev", workload="w2")
    elif case in ("replayed", "no_issuer"):
        jti = "jti-" + instance
        await _begin(s, _instance(), token_id=(jti, T0 + timedelta(minutes=5)))
        ask.update(token_id=(jti, T0 + timedelta(minutes=5)), self_terminated=True)
        if case == "replayed":
            ask.update(issuer="dev", workload="w")
    return ask


async def _answer(s: Ledgers, instance: str, ask: dict[str, Any]) -> Any:
    try:
        termination = await s.termination.request_termination(instance, **ask)
    except (NotPermitted, TokenInvalid, ValueError) as exc:
        return type(exc).__name__, getattr(exc, "code", None)
    return termination.job.state, termination.job.requested_by, termination.never_seen


@pytest.mark.parametrize(
    "case",
    [
        "never_seen",
        "terminating",
        "failed",
        "other_issuer",
        "other_workload",
        "replayed",
        "no_issuer",
    ],
)
async def test_every_other_termination_gets_the_general_paths_answer(pair, case):
    fast, general = pair
    answers, stories = [], []
    for s in (fast, general):
        instance = _instance()
        ask = await _set_up(s, case, instance)
        before = await _counts(s)
        answers.append(await _answer(s, instance, ask))
        after = await _counts(s)
        stories.append([a - b for a, b in zip(after, before, strict=True)])
    assert answers[0] == answers[1]
    assert stories[0] == stories[1]  # the same rows written (none where refused)
    expected = {
        "never_seen": ("pending", "operator:o", True),
        "terminating": ("pending", "operator:first", False),
        "failed": ("pending", "operator:first", False),
        "other_issuer": ("NotPermitted", "instance_issuer_mismatch"),
        "other_workload": ("NotPermitted", "instance_workload_mismatch"),
        "replayed": ("TokenInvalid", "token_replayed"),
        "no_issuer": ("ValueError", None),
    }[case]
    assert answers[0] == expected


class _Meddling:
    """The one-round-trip pool, with something done between the read and the function."""

    def __init__(self, trip: Any, meddle: Any) -> None:
        self._trip = trip
        self._meddle = meddle

    async def fetchrow(self, query: str, *args: Any) -> Any:
        row = await self._trip.fetchrow(query, *args)
        await self._meddle()
        return row

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._trip.fetchval(query, *args)


@pytest.mark.parametrize("meddle", ["terminated", "other_workload", "other_issuer", "job"])
async def test_a_row_that_changed_after_the_read_sends_the_termination_to_the_general_path(
    pair, meddle
):
    fast, general = pair
    instance = _instance()
    await _begin(fast, instance)

    async def change() -> None:
        if meddle == "terminated":
            await general.termination.request_termination(instance, actor="operator:other")
            return
        statement = {
            "other_workload": "UPDATE instances SET workload = 'w9' WHERE instance_id = :i",
            "other_issuer": "UPDATE instances SET issuer_name = 'x9' WHERE instance_id = :i",
            # Never so in the store (a job comes with the tombstone): the function's own
            # check, held to its word.
            "job": (
                "INSERT INTO revocation_jobs (job_id, instance_id, state, attempts, "
                "next_attempt_at, requested_by, created_at, updated_at) "
                "VALUES ('j-meddled', :i, 'done', 0, now(), 'x', now(), now())"
            ),
        }[meddle]
        async with general.database.transaction() as conn:
            await conn.execute(text(statement), {"i": instance})

    assert fast.database.one_trip is not None
    before: list[tuple[int, ...]] = []

    async def meddled() -> None:
        await change()
        before.append(await _counts(fast))

    with pytest.raises(GeneralCase):
        await onetrip.request_termination(
            _Meddling(fast.database.one_trip, meddled),
            FixedClock(T0),
            instance,
            actor="operator:o",
            issuer=None,
            workload=None,
            token_id=None,
            reason=None,
            incident=None,
            self_terminated=False,
        )
    assert await _counts(fast) == before[0]  # the function wrote nothing


# A job's end in one round trip (migration 0010) against the general path.


async def _terminated_with_leases(s: Ledgers, instance: str, n: int = 2) -> tuple[Any, list[str]]:
    """An instance with ``n`` active leases and a token, terminated, its job claimed by
    ``w``: (the job, the lease ids)."""
    leases = []
    for k in range(n):
        ticket = await _begin(s, instance, limit=None)
        if k == 0:
            await s.issuance.record_token(
                instance_id=instance, accessor=f"acc-{instance}", expires_at=T0 + timedelta(hours=1)
            )
        await _complete(s, ticket, f"database/creds/db/{instance}-{k}")
        leases.append(ticket.lease_id)
    await s.termination.request_termination(instance, actor="operator:o")
    [job] = await s.jobs.claim_jobs(worker="w", limit=1, claim_for=timedelta(seconds=60))
    assert job.instance_id == instance
    return job, leases


async def _end_story(s: Ledgers, instance: str) -> dict[str, Any]:
    row = (await _rows(s, m.Instance, m.Instance.instance_id == instance))[0]
    job = (await _rows(s, m.RevocationJob, m.RevocationJob.instance_id == instance))[0]
    leases = await _rows(s, m.Lease, m.Lease.instance_id == instance)
    tokens = await _rows(s, m.InstanceToken, m.InstanceToken.instance_id == instance)
    events = await _rows(s, m.AuditEvent, m.AuditEvent.instance_id == instance)
    ended = ("instance.token_revoked", "leases.revoked", "instance.terminated")
    return {
        "instance": _without(row, "instance_id"),
        "job": _without(job, "job_id", "instance_id"),
        "leases": sorted(
            (_without(r, "lease_id", "instance_id", "vault_lease_id") for r in leases),
            key=lambda r: str(sorted(r.items(), key=str)),
        ),
        "tokens": [_without(r, "accessor", "instance_id") for r in tokens],
        "events": [
            {
                **_without(e, "id", "seq", "prev_hash", "hash", "instance_id", "lease_id"),
                "detail": _without(e["detail"], "job_id", "lease_ids"),
                "lease_count": len(e["detail"].get("lease_ids", [])),
            }
            for e in sorted(events, key=lambda e: e["seq"])
            if e["action"] in ended
        ],
    }


@pytest.mark.parametrize("confirmed", [2, 0])
async def test_a_jobs_end_leaves_what_the_general_path_leaves(pair, monkeypatch, confirmed):
    """Two leases and the token confirmed; or only the token (the leases ended before)."""
    fast, general = pair
    stories = []
    for s in (fast, general):
        _general_path_only_for(s is general, monkeypatch, revocation, "record_confirmed")
        instance = _instance()
        job, leases = await _terminated_with_leases(s, instance)
        if confirmed:
            assert await s.ending.mark_revoke_sent(leases, T0) == 2
        else:
            for lease_id in leases:
                assert await s.issuance.end_lease(lease_id, LeaseState.RELEASED, "workload")
        revoked = leases if confirmed else []
        done = await s.jobs.finish_job(
            job, worker="w", tokens=[f"acc-{instance}"], revoked=revoked, actor="revocation:w"
        )
        assert done is True
        events = await _rows(s, m.AuditEvent, m.AuditEvent.instance_id == instance)
        said = {e["action"]: e["detail"] for e in events}
        assert said["instance.terminated"]["job_id"] == job.job_id
        if confirmed:
            assert said["leases.revoked"]["lease_ids"] == sorted(leases)
        stories.append(await _end_story(s, instance))
    assert stories[0] == stories[1]
    story = stories[0]
    assert [e["action"] for e in story["events"]] == [
        "instance.token_revoked",
        *(["leases.revoked"] if confirmed else []),
        "instance.terminated",
    ]
    assert story["job"]["state"] == "done" and story["instance"]["state"] == "terminated"
    assert {lease["state"] for lease in story["leases"]} == {"revoked" if confirmed else "released"}
    report = await AuditVerification(fast.chain).verify()
    assert report.ok, report.findings


_OTHER_ENDS = ["claim_lapsed", "live_lease", "token_recorded", "unstamped", "ended_meanwhile"]


@pytest.mark.parametrize("case", _OTHER_ENDS)
async def test_every_other_jobs_end_gets_the_general_paths_answer(pair, case):
    fast, general = pair
    answers, stories = [], []
    for s in (fast, general):
        instance = _instance()
        job, leases = await _terminated_with_leases(s, instance)
        stamped = leases if case != "unstamped" else leases[:1]
        await s.ending.mark_revoke_sent(stamped, T0)
        revoked = leases if case != "live_lease" else leases[:1]
        tokens = [f"acc-{instance}"]
        if case == "claim_lapsed":
            async with s.database.transaction() as conn:
                await conn.execute(
                    text("UPDATE revocation_jobs SET claimed_by = 'other' WHERE job_id = :j"),
                    {"j": job.job_id},
                )
        elif case == "token_recorded":  # an earlier pass recorded it, then stopped short
            await s.jobs.record_confirmed(instance, tokens=tokens, revoked=[], actor="revocation:w")
        elif case == "ended_meanwhile":  # confirmed gone, then released by its workload
            assert await s.issuance.end_lease(leases[1], LeaseState.RELEASED, "workload")
        if s is fast:  # the function itself writes nothing and hands it on
            assert fast.database.one_trip is not None
            untouched = await _end_story(s, instance)
            with pytest.raises(GeneralCase):
                await onetrip.finish_job(
                    fast.database.one_trip,
                    FixedClock(T0),
                    job,
                    worker="w",
                    tokens=tokens,
                    revoked=revoked,
                    actor="revocation:w",
                )
            assert await _end_story(s, instance) == untouched
        before = await _counts(s)
        try:
            answer: Any = await s.jobs.finish_job(
                job, worker="w", tokens=tokens, revoked=revoked, actor="revocation:w"
            )
        except LeasesStillLive as exc:
            answer = type(exc).__name__
        answers.append(answer)
        after = await _counts(s)
        written = [a - b for a, b in zip(after, before, strict=True)]
        stories.append((written, await _end_story(s, instance)))
    assert answers[0] == answers[1]
    assert stories[0] == stories[1]
    assert answers[0] == {
        "claim_lapsed": False,
        "live_lease": "LeasesStillLive",
        "token_recorded": True,
        "unstamped": "LeasesStillLive",
        "ended_meanwhile": True,
    }[case]
    if case == "ended_meanwhile":  # the general path's count: what moved, not what was said
        leases_revoked = [e for e in stories[0][1]["events"] if e["action"] == "leases.revoked"]
        assert [e["detail"]["count"] for e in leases_revoked] == [1]


async def test_a_jobs_end_waits_for_an_issuance_holding_the_instances_lock(pair):
    fast, general = pair
    instance = _instance()
    job, leases = await _terminated_with_leases(fast, instance)
    await fast.ending.mark_revoke_sent(leases, T0)
    async with general.database.transaction() as conn:
        await conn.execute(
            text("SELECT pg_advisory_xact_lock_shared(:c, hashtext(:i))"),
            {"c": INSTANCE_LOCK_CLASS, "i": instance},
        )
        ending = asyncio.create_task(
            fast.jobs.finish_job(job, worker="w", tokens=[], revoked=leases, actor="revocation:w")
        )
        await eventually(lambda: _waiting_for_instance_lock(fast), "the job's end waits")
        assert not ending.done()
    assert await ending is True
