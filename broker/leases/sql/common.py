"""SQL several ledgers share: the instance row lock, the audit insert, row → view."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, select
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
WHICH_INSTANCE = select(INSTANCES.c.state, INSTANCES.c.issuer_name, INSTANCES.c.workload).where(
    INSTANCES.c.instance_id == bindparam("b_iid")
)
_LOCK_SHARED = WHICH_INSTANCE.with_for_update(read=True)
_LOCK_EXCLUSIVE = WHICH_INSTANCE.with_for_update()
_INSERT_INSTANCE = INSTANCES.insert()
INSERT_SEEN = SEEN_TOKENS.insert()
LIVE = sorted(s.value for s in LIVE_LEASE_STATES)
# Lease ids listed in one audit event (its count is always complete).
AUDIT_MAX_IDS = 1000


def iso(dt: datetime | None) -> str | None:
    return iso_z(dt) if dt else None


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
    """Append one event to the chain, in the caller's transaction: the head row is locked
    until it commits, so sequence numbers have no gaps and replicas cannot fork the chain."""
    head = (await conn.execute(_LOCK_HEAD)).one()  # the migration wrote it
    seq, prev = int(head[0]) + 1, str(head[1])
    at = clock.now()
    document = chain.event_document(
        seq=seq,
        at=at,
        actor=actor[:128],
        action=action,
        instance_id=instance_id,
        lease_id=lease_id,
        outcome=outcome,
        reason=reason,
        detail=detail,
    )
    digest = chain.link_hash(prev, document)
    await conn.execute(
        AUDIT_EVENTS.insert().values(
            seq=seq,
            at=at,
            actor=document["actor"],
            action=action,
            instance_id=instance_id,
            lease_id=lease_id,
            outcome=outcome,
            reason=reason,
            detail=document["detail"],
            prev_hash=prev,
            hash=digest,
        )
    )
    await conn.execute(AUDIT_HEAD.update().where(AUDIT_HEAD.c.id == 1).values(seq=seq, hash=digest))


async def audit_many(
    conn: AsyncConnection,
    clock: Clock,
    actor: str,
    action: str,
    subjects: Sequence[tuple[str | None, dict[str, Any]]],
) -> None:
    """Append one event per (instance id, detail) of one action by one actor, as ``audit``
    does for one, under one lock of the head and with one insert: a bulk termination
    records thousands, and one round trip each would hold its batch's locks for longer."""
    if not subjects:
        return
    head = (await conn.execute(_LOCK_HEAD)).one()
    seq, prev = int(head[0]), str(head[1])
    at = clock.now()
    rows = []
    for instance_id, detail in subjects:
        seq += 1
        document = chain.event_document(
            seq=seq,
            at=at,
            actor=actor[:128],
            action=action,
            instance_id=instance_id,
            lease_id=None,
            outcome="ok",
            reason=None,
            detail=detail,
        )
        digest = chain.link_hash(prev, document)
        rows.append(
            {
                "seq": seq,
                "at": at,
                "actor": document["actor"],
                "action": action,
                "instance_id": instance_id,
                "lease_id": None,
                "outcome": "ok",
                "reason": None,
                "detail": document["detail"],
                "prev_hash": prev,
                "hash": digest,
            }
        )
        prev = digest
    await conn.execute(AUDIT_EVENTS.insert(), rows)
    await conn.execute(AUDIT_HEAD.update().where(AUDIT_HEAD.c.id == 1).values(seq=seq, hash=prev))


async def lock_instance(
    conn: AsyncConnection, instance_id: str, *, shared: bool = False
) -> tuple[str, str | None, str | None] | None:
    """Lock the instance row; its (state, issuer, workload). Issuance takes a shared lock (many
    requests of one instance proceed together); termination an exclusive one, so it
    waits for every in-flight ``issuing`` row to commit and its job then sees them all."""
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
    )


def instance_view(r: m.Instance) -> InstanceView:
    return InstanceView(
        r.instance_id, r.state, r.issuer_name, r.workload, r.created_at, r.terminated_at
    )
