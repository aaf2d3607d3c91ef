"""Locks' SQL: the active locks (read on every issuance and renewal), and an operator's
create, list and remove, each audited in its transaction."""

from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import Table, bindparam, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.clock import Clock
from broker.errors import Locked, NotFound
from broker.leases import models as m
from broker.leases.locks import LockSubject, refusing_lock
from broker.leases.sql.common import audit, iso
from broker.leases.views import LockView, new_id

LOCKS = cast(Table, m.Lock.__table__)
# Prebuilt: it runs on every issuance and renewal. ``ix_locks_removed`` keeps it an index
# scan over the few locks never removed.
_ACTIVE = (
    select(LOCKS)
    .where(
        LOCKS.c.removed_at.is_(None),
        or_(LOCKS.c.expires_at.is_(None), LOCKS.c.expires_at > bindparam("b_now")),
    )
    .order_by(LOCKS.c.created_at, LOCKS.c.lock_id)
)
MAX_LISTED = 1000


def _view(row: m.Lock) -> LockView:
    return LockView(
        row.lock_id,
        row.kind,
        row.value,
        row.claim,
        row.reason,
        row.incident,
        row.created_by,
        row.created_at,
        row.expires_at,
        row.removed_at,
        row.removed_by,
    )


async def active_locks(conn: AsyncConnection, now: datetime) -> list[LockView]:
    rows = (await conn.execute(_ACTIVE, {"b_now": now})).all()
    return [_view(m.Lock(**r._mapping)) for r in rows]


async def refuse_if_locked(conn: AsyncConnection, subject: LockSubject, now: datetime) -> None:
    """Raise ``Locked`` if an active lock matches the request."""
    lock = refusing_lock(await active_locks(conn, now), subject, now)
    if lock is not None:
        raise Locked(lock.lock_id)


async def create_lock(
    conn: AsyncConnection,
    clock: Clock,
    *,
    kind: str,
    value: str,
    claim: str | None,
    reason: str,
    incident: str | None,
    expires_at: datetime | None,
    actor: str,
) -> LockView:
    now = clock.now()
    lock_id = new_id("k")
    await conn.execute(
        LOCKS.insert().values(
            lock_id=lock_id,
            kind=kind,
            value=value,
            claim=claim,
            reason=reason,
            incident=incident,
            created_by=actor[:128],
            created_at=now,
            expires_at=expires_at,
        )
    )
    said = {"incident": incident} if incident else {}
    await audit(
        conn,
        clock,
        actor,
        "lock.created",
        reason=reason,
        lock_id=lock_id,
        kind=kind,
        value=value,
        claim=claim,
        expires_at=iso(expires_at),
        **said,
    )
    return await get_lock(conn, lock_id)


async def get_lock(conn: AsyncConnection, lock_id: str) -> LockView:
    row = (await conn.execute(select(LOCKS).where(LOCKS.c.lock_id == lock_id))).first()
    if row is None:
        raise NotFound("no such lock", code="lock_not_found")
    return _view(m.Lock(**row._mapping))


async def list_locks(
    conn: AsyncConnection, now: datetime, *, include_inactive: bool
) -> list[LockView]:
    if not include_inactive:
        return await active_locks(conn, now)
    stmt = select(LOCKS).order_by(LOCKS.c.created_at, LOCKS.c.lock_id).limit(MAX_LISTED)
    return [_view(m.Lock(**r._mapping)) for r in (await conn.execute(stmt)).all()]


async def remove_lock(
    conn: AsyncConnection,
    clock: Clock,
    lock_id: str,
    *,
    actor: str,
    reason: str | None,
    incident: str | None,
) -> LockView:
    """Remove a lock. Idempotent: a lock removed already is returned as it is (and its
    first removal stays the recorded one)."""
    now = clock.now()
    lock = await get_lock(conn, lock_id)
    if lock.removed_at is not None:
        return lock
    moved = await conn.execute(
        update(m.Lock)
        .where(m.Lock.lock_id == lock_id, m.Lock.removed_at.is_(None))
        .values(removed_at=now, removed_by=actor[:128])
    )
    if moved.rowcount:
        said = {"incident": incident} if incident else {}
        await audit(
            conn,
            clock,
            actor,
            "lock.removed",
            reason=reason,
            lock_id=lock_id,
            kind=lock.kind,
            value=lock.value,
            **said,
        )
    return await get_lock(conn, lock_id)
