"""Issuance's store steps, a termination and a revocation job's end in one round trip
each on PostgreSQL: the server-side functions migrations 0008 and 0010 created, called on
the ``Database``'s plain asyncpg pool.

Each serves the common case only (see the migrations) and raises ``GeneralCase`` having
written nothing otherwise (a termination's read may tell at once: None);
``broker.leases.records.IssuanceRecords`` and ``broker.leases.termination_records`` then
run the general path (``broker.leases.sql.issuance``, ``jobs``, ``revocation``), whose
answers these must equal: same rows, same audit events, byte for byte (the tests run both
paths side by side).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from broker.clock import Clock
from broker.leases.sql.common import (
    AUDIT_MAX_IDS,
    event_arguments,
    events_arguments,
    iso,
    pending_event,
)
from broker.leases.states import (
    COUNTED_LEASE_STATES,
    LIVE_LEASE_STATES,
    InstanceState,
    JobState,
    LeaseState,
    job_can_move,
    lease_can_move,
)
from broker.leases.views import IssuingRow, JobView, LeaseLimit, new_id

_BEGIN = "SELECT broker_begin_issue($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
_COMPLETE = (
    "SELECT broker_complete_issue($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, "
    "$13, $14, $15, $16, $17, $18, $19, $20, $21)"
)
_RECORD_TOKEN = "SELECT broker_record_token($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
_COUNTED = sorted(s.value for s in COUNTED_LEASE_STATES)
# The instance as a termination finds it, read without a lock: the event names its owner,
# and the function below refuses to go on if the row no longer says what was read here.
_TERMINATION_READ = (
    "SELECT i.state, i.issuer_name, i.workload, "
    "EXISTS (SELECT 1 FROM revocation_jobs j WHERE j.instance_id = i.instance_id) "
    "FROM instances i WHERE i.instance_id = $1"
)
_REQUEST_TERMINATION = (
    "SELECT broker_request_termination($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, "
    "$13, $14, $15, $16, $17, $18)"
)
_FINISH_JOB = (
    "SELECT broker_finish_job($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
)
# The live states a lease moves to ``revoked`` from (``mark_leases_ended``), and the live
# states a job cannot end with.
_REVOCABLE = sorted(s.value for s in LIVE_LEASE_STATES if lease_can_move(s, LeaseState.REVOKED))
_LIVE = sorted(s.value for s in LIVE_LEASE_STATES)


class OneTrip(Protocol):
    """One statement, its own transaction (``broker.leases.database.OneTrip``)."""

    async def fetchval(self, query: str, *args: Any) -> Any: ...

    async def fetchrow(self, query: str, *args: Any) -> Any: ...


def _json(value: dict[str, Any] | None) -> str:
    """As SQLAlchemy's JSON column writes it: None is JSON ``null``, not SQL NULL."""
    return json.dumps(value)


async def begin_issue(
    trip: OneTrip,
    lease_id: str,
    row: IssuingRow,
    *,
    now: datetime,
    token_id: tuple[str, datetime] | None,
    limit: LeaseLimit | None,
    external_ref: dict[str, Any] | None,
    vault_path: str | None,
    claims: dict[str, Any] | None,
) -> None:
    """Write the ``issuing`` row (and the instance's, the token id) or raise
    ``GeneralCase`` having written nothing."""
    await trip.fetchval(
        _BEGIN,
        lease_id,
        row.instance_id,
        row.issuer_name,
        row.workload,
        row.role,
        row.kind,
        token_id[0] if token_id else None,
        token_id[1] if token_id else None,
        limit.max_leases if limit else None,
        _COUNTED,
        _json(external_ref),
        vault_path,
        None if claims is None else json.dumps(claims),  # absent: SQL NULL, as the general path
        now,
    )


async def complete_issue(
    trip: OneTrip,
    lease_id: str,
    row: IssuingRow,
    *,
    now: datetime,
    vault_lease_id: str | None,
    accessor: str,
    renewable: bool,
    issued_at: datetime,
    expires_at: datetime,
    state: LeaseState,
    stale: datetime,
    engine: str | None,
    token_ref: str | None,
    credential_ref: dict[str, str] | None,
) -> bool:
    """Complete the ``issuing`` row of an instance still active, with its ``lease.issued``
    event; True. Raises ``GeneralCase`` having written nothing otherwise (an instance
    terminated meanwhile too: the general path records the credential withheld)."""
    subject: dict[str, Any] = {"issuer": row.issuer_name, "workload": row.workload}
    if token_ref is not None:
        subject["token"] = token_ref
    detail = {
        **subject,
        "role": row.role,
        "kind": row.kind,
        "engine": engine,
        "state": state.value,
        "vault_lease_id": vault_lease_id,
        "credential_ref": credential_ref,
        "renewable": renewable,
        "expires_at": iso(expires_at),
    }
    event = event_arguments(
        pending_event(
            "workload", "lease.issued", instance_id=row.instance_id, lease_id=lease_id, **detail
        ),
        now,
    )
    await trip.fetchval(
        _COMPLETE,
        lease_id,
        row.instance_id,
        row.issuer_name,
        row.workload,
        row.role,
        row.kind,
        state.value,
        vault_lease_id,
        accessor,
        renewable,
        issued_at,
        expires_at,
        stale,
        _json(credential_ref),
        now,
        event["tag"],
        event["at"],
        event["actor"],
        event["action"],
        event["detail"],
        event["unsequenced"],
    )
    return True


async def record_token(
    trip: OneTrip, *, now: datetime, instance_id: str, accessor: str, expires_at: datetime
) -> None:
    """Record an instance token's accessor, with its ``instance.token_created`` event (the
    accessor not named), for an active instance; else ``GeneralCase``, nothing written."""
    event = event_arguments(
        pending_event(
            "broker", "instance.token_created", instance_id=instance_id, expires_at=iso(expires_at)
        ),
        now,
    )
    await trip.fetchval(
        _RECORD_TOKEN,
        instance_id,
        accessor,
        expires_at,
        now,
        event["tag"],
        event["at"],
        event["actor"],
        event["action"],
        event["detail"],
        event["unsequenced"],
    )


async def request_termination(
    trip: OneTrip,
    clock: Clock,
    instance_id: str,
    *,
    actor: str,
    issuer: str | None,
    workload: str | None,
    token_id: tuple[str, datetime] | None,
    reason: str | None,
    incident: str | None,
    self_terminated: bool,
) -> tuple[JobView, bool] | None:
    """Tombstone an active instance that has no job yet, queue its job and record the
    ``instance.terminate_requested`` event, as ``broker.leases.sql.jobs.request_termination``
    does; the job and whether the broker never saw the instance. Every other case has
    nothing written: None when the read tells (an id never seen, a job already there,
    another owner), else ``GeneralCase`` from the function, which re-reads the row under
    the instance's lock (two round trips in all)."""
    found = await trip.fetchrow(_TERMINATION_READ, instance_id)
    if found is None or found[0] != InstanceState.ACTIVE.value or found[3]:
        return None
    owner, owner_workload = found[1], found[2]
    if (issuer is not None and owner is not None and owner != issuer) or (
        workload is not None and owner_workload is not None and owner_workload != workload
    ):
        return None  # another owner: the general path refuses it
    if token_id is not None and issuer is None:
        return None  # a token id without its issuer: the general path refuses it
    now = clock.now()
    job = JobView(
        job_id=new_id("j"),
        instance_id=instance_id,
        state=JobState.PENDING.value,
        attempts=0,
        next_attempt_at=now,
        last_error=None,
        requested_by=actor[:64],
        created_at=now,
        completed_at=None,
        reason=reason[:200] if reason else None,
        incident=incident,
    )
    event = event_arguments(
        pending_event(
            actor,
            "instance.terminate_requested",
            instance_id=instance_id,
            reason=reason,
            job_id=job.job_id,
            issuer=owner or issuer,
            workload=owner_workload or workload,
            previous_state=InstanceState.ACTIVE.value,
            self_terminated=self_terminated,
            **({"incident": incident} if incident else {}),
        ),
        now,
    )
    seen = await trip.fetchval(
        _REQUEST_TERMINATION,
        instance_id,
        owner,
        owner_workload,
        token_id[0] if token_id else None,
        issuer if token_id else None,
        token_id[1] if token_id else None,
        job.job_id,
        job.requested_by,
        job.reason,
        incident,
        now,
        event["tag"],
        event["at"],
        event["actor"],
        event["action"],
        event["reason"],
        event["detail"],
        event["unsequenced"],
    )
    return job, not seen


async def finish_job(
    trip: OneTrip,
    clock: Clock,
    job: JobView,
    *,
    worker: str,
    tokens: Sequence[str],
    revoked: Sequence[str],
    actor: str,
) -> None:
    """Record what the job's last pass confirmed (``tokens`` revoked, leases ``revoked``
    by ``actor``) and end the job and its instance, with the events the general path
    (``revocation.record_confirmed`` and ``jobs.finish_job``) appends, in its order.
    Raises ``GeneralCase`` having written nothing unless every token and lease moves, no
    lease of the instance is left live and the job still runs under ``worker``'s claim.
    Raises ``ValueError`` if the job state table forbids running -> done (a bug), as the
    general path does."""
    if not job_can_move(JobState.RUNNING, JobState.DONE):
        raise ValueError("a revocation job cannot move from running to done")
    now = clock.now()
    instance = job.instance_id
    events = [
        pending_event("revocation", "instance.token_revoked", instance_id=instance)
        for _ in tokens
    ]
    if revoked:
        events.append(
            pending_event(
                actor,
                f"leases.{LeaseState.REVOKED.value}",
                instance_id=instance,
                count=len(revoked),
                lease_ids=sorted(revoked)[:AUDIT_MAX_IDS],
            )
        )
    events.append(
        pending_event(
            f"revocation:{worker}", "instance.terminated", instance_id=instance, job_id=job.job_id
        )
    )
    columns = events_arguments(events, now)
    await trip.fetchval(
        _FINISH_JOB,
        job.job_id,
        instance,
        worker[:64],
        list(tokens),
        list(revoked),
        _REVOCABLE,
        _LIVE,
        now,
        columns["tag"],
        columns["at"],
        columns["actor"],
        columns["action"],
        columns["detail"],
        columns["unsequenced"],
    )
