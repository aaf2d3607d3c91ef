"""Termination's SQL: the tombstone and its revocation job, and the job's claims and end
(what a job revokes and records as ended: ``sql.revocation``).

Every update of a job's state selects its row through ``_job_in``, which consults the
job state table (``states.JOB_TRANSITIONS``): no statement here can move a job along a
transition the table forbids, and a row found in another state is left as it is."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, bindparam, or_, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.clock import Clock, iso_z
from broker.errors import BadRequest, NotFound
from broker.leases import models as m
from broker.leases.sql.common import (
    INSTANCE_LOCK_CLASS,
    JOBS,
    audit,
    ensure_instance,
    job_view,
    require_owner,
    use_token_once,
)
from broker.leases.states import (
    InstanceState,
    JobState,
    job_can_move,
)
from broker.leases.views import (
    JobView,
    new_id,
)

# Every listed instance's advisory lock, each key once, in key order (ids may share one).
_LOCK_ALL = text(
    f"SELECT count(pg_advisory_xact_lock({INSTANCE_LOCK_CLASS}, k)) "  # noqa: S608
    "FROM (SELECT DISTINCT hashtext(i) AS k FROM unnest(:b_ids) AS i ORDER BY k) AS keys"
).bindparams(bindparam("b_ids", type_=ARRAY(String)))


def _job_in(old: JobState, new: JobState) -> Any:
    """The job row is in ``old``, which the job state table lets move to ``new``. Raises
    ``ValueError`` for a move the table forbids: that is a bug in the caller."""
    if not job_can_move(old, new):
        raise ValueError(f"a revocation job cannot move from {old.value} to {new.value}")
    return m.RevocationJob.state == old.value


def _still_claimed(job: JobView, worker: str, new: JobState) -> Any:
    """The job is still running under this worker's claim: a worker whose claim lapsed
    (and was taken over) can neither finish nor reschedule it."""
    return (
        (m.RevocationJob.job_id == job.job_id)
        & _job_in(JobState.RUNNING, new)
        & (m.RevocationJob.claimed_by == worker[:64])
    )


async def _the_job(conn: AsyncConnection, instance_id: str) -> JobView:
    row = (
        await conn.execute(
            select(m.RevocationJob).where(m.RevocationJob.instance_id == instance_id)
        )
    ).one()
    return job_view(m.RevocationJob(**row._mapping))


async def request_termination(
    conn: AsyncConnection,
    clock: Clock,
    instance_id: str,
    *,
    actor: str,
    issuer: str | None,
    workload: str | None = None,
    token_id: tuple[str, datetime] | None = None,
    reason: str | None = None,
    incident: str | None = None,
    self_terminated: bool = False,
) -> JobView:
    """``self_terminated``: the instance ends itself (its own token), said by the caller:
    whether a token id is used once depends on the issuer's replay rule, not on who asks."""
    now = clock.now()
    state, owner, owner_workload = await ensure_instance(
        conn, clock, instance_id, issuer, workload, InstanceState.TERMINATING
    )
    require_owner(instance_id, owner, owner_workload, issuer=issuer, workload=workload)
    if token_id is not None:
        if issuer is None:
            raise ValueError("a token id is used once per issuer: name the issuer")
        await use_token_once(
            conn, issuer, token_id, "this token was already used; get a fresh token"
        )
    if state == InstanceState.ACTIVE:
        await conn.execute(
            update(m.Instance)
            .where(m.Instance.instance_id == instance_id)
            .values(state=InstanceState.TERMINATING.value, updated_at=now)
        )
    job = (
        await conn.execute(
            select(m.RevocationJob).where(m.RevocationJob.instance_id == instance_id)
        )
    ).first()
    if job is None:
        job_id = new_id("j")
        row = _job_row(job_id, instance_id, actor, reason, incident, now)
        await conn.execute(JOBS.insert().values(row))
        # Whose instance, as far as the broker knows (never seen: the caller's word).
        await _audit_requested(
            conn,
            clock,
            actor,
            instance_id,
            job_id,
            (owner or issuer, owner_workload or workload),
            previous_state=state,
            self_terminated=self_terminated,
            reason=reason,
            incident=incident,
        )
        return job_view(m.RevocationJob(**row))  # as inserted: no read back
    if job.state == JobState.FAILED.value:
        await _requeue(conn, clock, job.job_id, instance_id, actor, now, reason, incident)
    return await _the_job(conn, instance_id)


async def request_terminations(
    conn: AsyncConnection,
    clock: Clock,
    instance_ids: Sequence[str],
    *,
    actor: str,
    reason: str | None = None,
    incident: str | None = None,
) -> list[tuple[str, str]]:
    """``request_termination`` for a batch of instances the store holds, set-based (a
    statement per step, not per instance): each row locked exclusively, in id order (as
    one at a time would, waiting for in-flight issuance), the active ones tombstoned, a job
    and an audit event each. Instances no longer active are left as they are (their job
    exists). Returns (instance id, job id) of the jobs it created."""
    now = clock.now()
    ids = sorted(set(instance_ids))
    if not ids:
        return []
    if conn.dialect.name == "postgresql":  # as ``lock_instance``, in the rows' order below
        await conn.execute(_LOCK_ALL, {"b_ids": ids})
    rows = (
        await conn.execute(
            select(
                m.Instance.instance_id,
                m.Instance.state,
                m.Instance.issuer_name,
                m.Instance.workload,
            )
            .where(m.Instance.instance_id.in_(ids))
            .order_by(m.Instance.instance_id)
            .with_for_update()
        )
    ).all()
    active = [r[0] for r in rows if r[1] == InstanceState.ACTIVE.value]
    owners = {r[0]: (r[2], r[3]) for r in rows}
    if not active:
        return []
    await conn.execute(
        update(m.Instance)
        .where(
            m.Instance.instance_id.in_(active), m.Instance.state == InstanceState.ACTIVE.value
        )
        .values(state=InstanceState.TERMINATING.value, updated_at=now)
    )
    have = set(
        (
            await conn.execute(
                select(m.RevocationJob.instance_id).where(
                    m.RevocationJob.instance_id.in_(active)
                )
            )
        ).scalars()
    )
    created = [(iid, new_id("j")) for iid in active if iid not in have]
    if not created:
        return []
    await conn.execute(
        JOBS.insert(),
        [
            _job_row(job_id, instance_id, actor, reason, incident, now)
            for instance_id, job_id in created
        ],
    )
    # One event each, as one at a time would record it; the transaction appends them to
    # the chain together, under one lock of its head and with one insert.
    for instance_id, job_id in created:
        await _audit_requested(
            conn,
            clock,
            actor,
            instance_id,
            job_id,
            owners[instance_id],
            previous_state=InstanceState.ACTIVE.value,
            self_terminated=False,
            reason=reason,
            incident=incident,
        )
    return created


async def requeue_failed(
    conn: AsyncConnection,
    clock: Clock,
    instances: Any,
    *,
    limit: int,
    actor: str,
    reason: str | None = None,
    incident: str | None = None,
) -> list[tuple[str, str]]:
    """Up to ``limit`` failed jobs of ``instances`` (a subquery of instance ids) back in
    the queue, as ``request_termination`` does for one instance: rows locked in instance id
    order, one update, a ``revocation.requeued`` event each. Returns (instance id, job id)."""
    now = clock.now()
    failed = m.RevocationJob.state == JobState.FAILED.value
    rows = (
        await conn.execute(
            select(m.RevocationJob.instance_id, m.RevocationJob.job_id)
            .where(failed, m.RevocationJob.instance_id.in_(instances))
            .order_by(m.RevocationJob.instance_id)
            .limit(limit)
            .with_for_update()
        )
    ).all()
    found = [(str(iid), str(job_id)) for iid, job_id in rows]
    if not found:
        return []
    await conn.execute(
        update(m.RevocationJob)
        .where(
            m.RevocationJob.job_id.in_([j for _, j in found]),
            _job_in(JobState.FAILED, JobState.PENDING),
        )
        .values(state=JobState.PENDING.value, next_attempt_at=now, attempts=0, updated_at=now)
    )
    said = {"incident": incident} if incident else {}
    for instance_id, job_id in found:
        await audit(
            conn,
            clock,
            actor,
            "revocation.requeued",
            instance_id=instance_id,
            reason=reason,
            job_id=job_id,
            **said,
        )
    return found


def _job_row(
    job_id: str,
    instance_id: str,
    actor: str,
    reason: str | None,
    incident: str | None,
    now: datetime,
) -> dict[str, Any]:
    """A new revocation job's row, as one termination and a bulk batch both insert it."""
    return {
        "job_id": job_id,
        "instance_id": instance_id,
        "state": JobState.PENDING.value,
        "attempts": 0,
        "next_attempt_at": now,
        "requested_by": actor[:64],
        "reason": reason[:200] if reason else None,
        "incident": incident,
        "created_at": now,
        "updated_at": now,
    }


async def _audit_requested(
    conn: AsyncConnection,
    clock: Clock,
    actor: str,
    instance_id: str,
    job_id: str,
    owner: tuple[str | None, str | None],
    *,
    previous_state: str,
    self_terminated: bool,
    reason: str | None,
    incident: str | None,
) -> None:
    """The ``instance.terminate_requested`` event: who asked, why, whose instance (its
    issuer and workload) and the job, the same for one termination and for a bulk batch."""
    await audit(
        conn,
        clock,
        actor,
        "instance.terminate_requested",
        instance_id=instance_id,
        reason=reason,
        job_id=job_id,
        issuer=owner[0],
        workload=owner[1],
        previous_state=previous_state,
        self_terminated=self_terminated,
        **({"incident": incident} if incident else {}),
    )


async def _requeue(
    conn: AsyncConnection,
    clock: Clock,
    job_id: str,
    instance_id: str,
    actor: str,
    now: datetime,
    reason: str | None = None,
    incident: str | None = None,
) -> None:
    """A failed job back in the queue, its attempts counted from zero."""
    await conn.execute(
        update(m.RevocationJob)
        .where(m.RevocationJob.job_id == job_id, _job_in(JobState.FAILED, JobState.PENDING))
        .values(state=JobState.PENDING.value, next_attempt_at=now, attempts=0, updated_at=now)
    )
    said = {"incident": incident} if incident else {}
    await audit(
        conn,
        clock,
        actor,
        "revocation.requeued",
        instance_id=instance_id,
        reason=reason,
        job_id=job_id,
        **said,
    )


async def retry_job(
    conn: AsyncConnection,
    clock: Clock,
    job_id: str,
    *,
    actor: str,
    reason: str | None = None,
    incident: str | None = None,
) -> JobView:
    now = clock.now()
    row = (
        await conn.execute(select(m.RevocationJob).where(m.RevocationJob.job_id == job_id))
    ).first()
    if row is None:
        raise NotFound("no such revocation job", code="job_not_found")
    if row.state != JobState.FAILED.value:
        raise BadRequest(
            f"the job is {row.state}; only a failed job can be retried",
            code="job_not_failed",
        )
    await _requeue(conn, clock, job_id, row.instance_id, actor, now, reason, incident)
    row = (
        await conn.execute(select(m.RevocationJob).where(m.RevocationJob.job_id == job_id))
    ).one()
    return job_view(m.RevocationJob(**row._mapping))


async def claim_jobs(
    conn: AsyncConnection, clock: Clock, *, worker: str, limit: int, claim_for: timedelta
) -> list[JobView]:
    now = clock.now()
    due = or_(
        _job_in(JobState.PENDING, JobState.RUNNING) & (m.RevocationJob.next_attempt_at <= now),
        # A running job whose claim lapsed: its worker died, another takes it over.
        _job_in(JobState.RUNNING, JobState.RUNNING) & (m.RevocationJob.claimed_until < now),
    )
    ids = (
        (
            await conn.execute(
                select(m.RevocationJob.job_id)
                .where(due)
                .order_by(m.RevocationJob.next_attempt_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        )
        .scalars()
        .all()
    )
    if not ids:
        return []
    # One update for the batch; ``due`` again in it, so that on SQLite (no row locks) a
    # job another worker claimed meanwhile is left out.
    rows = (
        await conn.execute(
            update(m.RevocationJob)
            .where(m.RevocationJob.job_id.in_(ids), due)
            .values(
                state=JobState.RUNNING.value,
                claimed_by=worker[:64],
                claimed_until=now + claim_for,
                attempts=m.RevocationJob.attempts + 1,
                updated_at=now,
            )
            .returning(*m.RevocationJob.__table__.columns)
        )
    ).all()
    order = {job_id: k for k, job_id in enumerate(ids)}
    jobs = [job_view(m.RevocationJob(**r._mapping)) for r in rows]
    return sorted(jobs, key=lambda job: order[job.job_id])


async def extend_claim(
    conn: AsyncConnection, clock: Clock, job: JobView, *, worker: str, claim_for: timedelta
) -> bool:
    now = clock.now()
    res = await conn.execute(
        update(m.RevocationJob)
        .where(_still_claimed(job, worker, JobState.RUNNING))
        .values(claimed_until=now + claim_for, updated_at=now)
    )
    return res.rowcount == 1


async def finish_job(conn: AsyncConnection, clock: Clock, job: JobView, *, worker: str) -> bool:
    """The job done and the instance terminated; the caller has ``record_confirmed`` in the
    same transaction and found no live lease. False: our claim lapsed and another worker
    holds the job now."""
    now = clock.now()
    res = await conn.execute(
        update(m.RevocationJob)
        .where(_still_claimed(job, worker, JobState.DONE))
        .values(
            state=JobState.DONE.value,
            completed_at=now,
            updated_at=now,
            claimed_until=None,
            last_error=None,
        )
    )
    if res.rowcount != 1:
        return False
    await conn.execute(
        update(m.Instance)
        .where(m.Instance.instance_id == job.instance_id)
        .values(state=InstanceState.TERMINATED.value, terminated_at=now, updated_at=now)
    )
    await audit(
        conn,
        clock,
        f"revocation:{worker}",
        "instance.terminated",
        instance_id=job.instance_id,
        job_id=job.job_id,
    )
    return True


async def reschedule_job(
    conn: AsyncConnection,
    clock: Clock,
    job: JobView,
    *,
    worker: str,
    error: str,
    next_attempt_at: datetime,
    give_up: bool,
    count_attempt: bool,
) -> None:
    now = clock.now()
    state = JobState.FAILED if give_up else JobState.PENDING
    res = await conn.execute(
        update(m.RevocationJob)
        .where(_still_claimed(job, worker, state))
        .values(
            state=state.value,
            attempts=m.RevocationJob.attempts - (0 if count_attempt else 1),
            next_attempt_at=next_attempt_at,
            last_error=error[:255],
            claimed_until=None,
            updated_at=now,
        )
    )
    if res.rowcount and (give_up or count_attempt):
        # A failed attempt (retried at ``next_attempt_at``) or the last one; a pass that
        # only waited for in-flight issuance changed nothing worth recording.
        await audit(
            conn,
            clock,
            f"revocation:{worker}",
            "revocation.failed" if give_up else "revocation.retry_scheduled",
            instance_id=job.instance_id,
            outcome="failed" if give_up else "error",
            reason=error[:200],
            job_id=job.job_id,
            attempts=job.attempts,
            next_attempt_at=iso_z(next_attempt_at),
        )
