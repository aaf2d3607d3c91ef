"""SQL several ledgers share: the instance row lock, the audit insert, row → view."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.clock import Clock, iso_z
from broker.errors import NotPermitted, TokenInvalid
from broker.leases import chain
from broker.leases import models as m
from broker.leases.states import LIVE_LEASE_STATES, InstanceState
from broker.leases.views import InstanceView, JobView, LeaseView

# The issuance hot path runs these prebuilt statements: SQLAlchemy memoizes their cache keys,
# which per-call construction would recompute on every request.
# The tables themselves, for Core statements (an ORM class's ``__table__`` is typed as any
# FromClause, which has no insert/update/delete).
INSTANCES = cast(Table, m.Instance.__table__)
LEASES = cast(Table, m.Lease.__table__)
TOKENS = cast(Table, m.InstanceToken.__table__)
JOBS = cast(Table, m.RevocationJob.__table__)
SEEN_TOKENS = cast(Table, m.SeenToken.__table__)
AUDIT_EVENTS = cast(Table, m.AuditEvent.__table__)
AUDIT_HEAD = cast(Table, m.AuditHead.__table__)
_LOCK_HEAD = (
    select(AUDIT_HEAD.c.seq, AUDIT_HEAD.c.hash).where(AUDIT_HEAD.c.id == 1).with_for_update()
)
_INSERT_EVENT = AUDIT_EVENTS.insert()
_MOVE_HEAD = (
    AUDIT_HEAD.update()
    .where(AUDIT_HEAD.c.id == 1)
    .values(seq=bindparam("b_seq"), hash=bindparam("b_hash"))
)
# PostgreSQL: the whole append server-side (``audit_append``, created by migration 0005).
_APPEND = text(
    "SELECT audit_append(:tag, :at, :actor, :action, :instance, :lease, :outcome, :reason, "
    ":detail, :unsequenced)"
)
# Keys in ``conn.info``: the events a transaction recorded, and its clock.
AUDIT_PENDING = "broker.audit.pending"
AUDIT_CLOCK = "broker.audit.clock"
WHICH_INSTANCE = select(INSTANCES.c.state, INSTANCES.c.issuer_name, INSTANCES.c.workload).where(
    INSTANCES.c.instance_id == bindparam("b_iid")
)
_LOCK_SHARED = WHICH_INSTANCE.with_for_update(read=True)
_LOCK_EXCLUSIVE = WHICH_INSTANCE.with_for_update()
# An instance's advisory lock (PostgreSQL): (this class, hashtext of the id). Migration
# 0008's functions take the same; a collision of two ids' hashes only makes one wait.
INSTANCE_LOCK_CLASS = 1_386_218_069
_ADVISORY_SHARED = text(
    f"SELECT pg_advisory_xact_lock_shared({INSTANCE_LOCK_CLASS}, hashtext(:b_iid))"
)
_ADVISORY = text(f"SELECT pg_advisory_xact_lock({INSTANCE_LOCK_CLASS}, hashtext(:b_iid))")
_INSERT_INSTANCE = INSTANCES.insert()
INSERT_SEEN = SEEN_TOKENS.insert()
LIVE = sorted(s.value for s in LIVE_LEASE_STATES)
# Lease ids listed in one audit event (its count is always complete).
AUDIT_MAX_IDS = 1000


def iso(dt: datetime | None) -> str | None:
    return iso_z(dt) if dt else None


@dataclass(frozen=True)
class _Pending:
    """An event recorded by a transaction, appended to the chain when it commits."""

    actor: str
    action: str
    instance_id: str | None
    lease_id: str | None
    outcome: str
    reason: str | None
    detail: dict[str, Any]


async def audit(
    conn: AsyncConnection,
    clock: Clock,
    actor: str,
    action: str,
    *,
    instance_id: str | None = None,
    lease_id: str | None = None,
    outcome: str = "ok",
    reason: str | None = None,
    **detail: Any,
) -> None:
    """Record one event in the caller's transaction. It is appended to the chain by
    ``flush_audit`` just before that transaction commits (``Database.transaction`` calls
    it), so the head row is locked only from the append to the commit, and several events
    of one transaction share one head read and one head update. A transaction that rolls
    back records nothing."""
    conn.info.setdefault(AUDIT_PENDING, []).append(
        pending_event(
            actor,
            action,
            instance_id=instance_id,
            lease_id=lease_id,
            outcome=outcome,
            reason=reason,
            **detail,
        )
    )
    conn.info[AUDIT_CLOCK] = clock


def discard_audit(conn: AsyncConnection) -> None:
    """Forget events recorded by a transaction that did not commit (``conn.info`` belongs
    to the pooled connection and outlives the transaction)."""
    conn.info.pop(AUDIT_PENDING, None)
    conn.info.pop(AUDIT_CLOCK, None)


async def flush_audit(conn: AsyncConnection) -> int:
    """Append the transaction's recorded events to the chain, under the ``audit_head`` row
    lock (held until the commit that follows), so sequence numbers have no gaps and
    replicas cannot fork the chain. The events of one transaction share its time. Returns
    how many were appended."""
    pending: list[_Pending] = conn.info.pop(AUDIT_PENDING, None) or []
    clock: Clock | None = conn.info.pop(AUDIT_CLOCK, None)
    if not pending or clock is None:
        return 0
    at = clock.now()
    documents = _documents(pending, at)
    if conn.dialect.name == "postgresql":
        # One round trip: the head row is locked from here to the commit, and on a busy
        # broker every hop back to Python in between would keep it locked longer.
        await conn.execute(_APPEND, append_arguments(pending, documents, at))
        return len(pending)
    head = (await conn.execute(_LOCK_HEAD)).one()  # the migration wrote it
    seq, prev = int(head[0]), str(head[1])
    rows = []
    for event, document in zip(pending, documents, strict=True):
        seq += 1
        digest = chain.link_hash(prev, {**document, "seq": seq})
        rows.append(
            {
                "seq": seq,
                "at": at,
                "actor": event.actor,
                "action": event.action,
                "instance_id": event.instance_id,
                "lease_id": event.lease_id,
                "outcome": event.outcome,
                "reason": event.reason,
                "detail": document["detail"],
                "prev_hash": prev,
                "hash": digest,
            }
        )
        prev = digest
    await conn.execute(_INSERT_EVENT, rows)
    await conn.execute(_MOVE_HEAD, {"b_seq": seq, "b_hash": prev})
    return len(rows)


def _documents(pending: list[_Pending], at: datetime) -> list[dict[str, Any]]:
    return [
        chain.event_document(
            seq=0,  # assigned under the lock
            at=at,
            actor=e.actor,
            action=e.action,
            instance_id=e.instance_id,
            lease_id=e.lease_id,
            outcome=e.outcome,
            reason=e.reason,
            detail=e.detail,
        )
        for e in pending
    ]


def append_arguments(
    pending: list[_Pending], documents: list[dict[str, Any]], at: datetime
) -> dict[str, Any]:
    """What PostgreSQL's ``audit_append`` takes for these events (column by column)."""
    return {
        "tag": chain.TAG,
        "at": at,
        "actor": [e.actor for e in pending],
        "action": [e.action for e in pending],
        "instance": [e.instance_id for e in pending],
        "lease": [e.lease_id for e in pending],
        "outcome": [e.outcome for e in pending],
        "reason": [e.reason for e in pending],
        "detail": [json.dumps(d["detail"]) for d in documents],
        "unsequenced": [chain.unsequenced(d) for d in documents],
    }


def pending_event(
    actor: str,
    action: str,
    *,
    instance_id: str | None = None,
    lease_id: str | None = None,
    outcome: str = "ok",
    reason: str | None = None,
    **detail: Any,
) -> _Pending:
    """An event as ``audit`` records it (its fields cut to their columns' widths)."""
    return _Pending(
        actor=actor[:128],
        action=action,
        instance_id=instance_id,
        lease_id=lease_id,
        outcome=outcome,
        reason=reason[:200] if reason else None,
        detail=detail,
    )


def event_arguments(event: _Pending, at: datetime) -> dict[str, Any]:
    """One event's ``audit_append`` arguments as scalars, for a server-side function that
    appends it itself."""
    columns = events_arguments([event], at)
    return {k: v if k in ("tag", "at") else v[0] for k, v in columns.items()}


def events_arguments(events: list[_Pending], at: datetime) -> dict[str, Any]:
    """Events' ``audit_append`` arguments, column by column, in their order, for a
    server-side function that appends them itself (in one transaction, one time)."""
    return append_arguments(events, _documents(events, at), at)


async def lock_instance(
    conn: AsyncConnection, instance_id: str, *, shared: bool = False
) -> tuple[str, str | None, str | None] | None:
    """Lock the instance row; its (state, issuer, workload). Issuance takes a shared lock (many
    requests of one instance proceed together); termination an exclusive one, so it
    waits for every in-flight ``issuing`` row to commit and its job then sees them all."""
    if conn.dialect.name == "postgresql":
        # Its own statement, before the row is read, so the read's snapshot follows a
        # termination that held the lock. Shared: an advisory lock, not a row lock, which
        # PostgreSQL turns into a MultiXact when several requests of one instance share it.
        await conn.execute(_ADVISORY_SHARED if shared else _ADVISORY, {"b_iid": instance_id})
        stmt = WHICH_INSTANCE if shared else _LOCK_EXCLUSIVE
    else:  # SQLite has one writer at a time: the read is the lock
        stmt = _LOCK_SHARED if shared else _LOCK_EXCLUSIVE
    row = (await conn.execute(stmt, {"b_iid": instance_id})).first()
    return (row[0], row[1], row[2]) if row else None


async def ensure_instance(
    conn: AsyncConnection,
    clock: Clock,
    instance_id: str,
    issuer_name: str | None,
    workload: str | None,
    state: InstanceState,
    *,
    shared: bool = False,
    claims: dict[str, Any] | None = None,
) -> tuple[str, str | None, str | None]:
    """Lock the instance's row, writing it first if the broker never saw the instance;
    ``claims``: the identity's claims to record on a row written here (first issuance)."""
    current = await lock_instance(conn, instance_id, shared=shared)
    if current is not None:
        return current
    now = clock.now()
    row: dict[str, Any] = {
        "instance_id": instance_id,
        "issuer_name": issuer_name,
        "workload": workload,
        "state": state.value,
        "created_at": now,
        "updated_at": now,
        "last_seen_at": now if state == InstanceState.ACTIVE else None,
    }
    if claims is not None:  # absent, not JSON null: the column stays SQL NULL
        row["claims"] = claims
    try:
        async with conn.begin_nested():
            await conn.execute(_INSERT_INSTANCE, row)
    except IntegrityError:
        pass  # created concurrently: lock the winner's row below
    current = await lock_instance(conn, instance_id, shared=shared)
    assert current is not None
    return current


def require_owner(
    instance_id: str,
    owner: str | None,
    owner_workload: str | None,
    *,
    issuer: str | None,
    workload: str | None,
) -> None:
    """The instance row's owner against the caller's. Raises ``NotPermitted``."""
    if issuer is not None and owner is not None and owner != issuer:
        # Instance ids are unique only per issuer: the first issuer to present one
        # owns it, and no other issuer's token can draw on or end its leases.
        raise NotPermitted(
            f"instance {instance_id} belongs to another issuer",
            code="instance_issuer_mismatch",
        )
    if workload is not None and owner_workload is not None and owner_workload != workload:
        # An instance runs one workload; another workload presenting the same
        # instance id is a collision or an impostor, not the same instance.
        raise NotPermitted(
            f"instance {instance_id} belongs to another workload",
            code="instance_workload_mismatch",
        )


async def use_token_once(
    conn: AsyncConnection, issuer_name: str, token_id: tuple[str, datetime], message: str
) -> None:
    """Record a token id (jti, the token's expiry) as used by ``issuer_name``'s token, in
    the caller's transaction. Raises ``TokenInvalid`` (``token_replayed``, ``message``)
    if it was used already."""
    try:
        async with conn.begin_nested():
            await conn.execute(
                INSERT_SEEN,
                {"issuer_name": issuer_name, "jti": token_id[0], "expires_at": token_id[1]},
            )
    except IntegrityError:
        raise TokenInvalid(message, code="token_replayed", issuer_name=issuer_name) from None


def lease_view(r: m.Lease) -> LeaseView:
    return LeaseView(
        r.lease_id,
        r.instance_id,
        r.workload,
        r.role,
        r.kind,
        r.state,
        r.renewable,
        r.created_at,
        r.issued_at,
        r.expires_at,
        r.ended_at,
        r.vault_lease_id,
        r.token_accessor,
        r.external_ref,
        r.vault_path,
        r.credential_ref,
        r.revoke_sent_at,
        r.resolved_at,
        r.resolved_by,
        r.resolved_reason,
        r.resolved_incident,
    )


def job_view(r: m.RevocationJob) -> JobView:
    return JobView(
        r.job_id,
        r.instance_id,
        r.state,
        r.attempts,
        r.next_attempt_at,
        r.last_error,
        r.requested_by,
        r.created_at,
        r.completed_at,
        r.reason,
        r.incident,
    )


def instance_view(r: m.Instance) -> InstanceView:
    return InstanceView(
        r.instance_id, r.state, r.issuer_name, r.workload, r.created_at, r.terminated_at
    )
