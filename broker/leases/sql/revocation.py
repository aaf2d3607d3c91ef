"""What a revocation job revokes (the instance's tokens and live leases) and records as
ended, in the caller's transaction."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import cast

from sqlalchemy import func, select, true, update
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.clock import Clock
from broker.leases import models as m
from broker.leases.sql.common import AUDIT_MAX_IDS, LIVE, audit, lease_view, lock_instance
from broker.leases.states import LIVE_LEASE_STATES, LeaseState, lease_can_move
from broker.leases.views import LeaseView, RevocationWork, TokenView

log = logging.getLogger(__name__)

async def revocation_work(conn: AsyncConnection, instance_id: str) -> RevocationWork:
    toks = (
        await conn.execute(
            select(m.InstanceToken).where(m.InstanceToken.instance_id == instance_id)
        )
    ).all()
    leases = (
        await conn.execute(
            select(m.Lease).where(m.Lease.instance_id == instance_id, m.Lease.state.in_(LIVE))
        )
    ).all()
    return RevocationWork(
        tokens=tuple(TokenView(t.accessor, t.expires_at, t.revoked_at) for t in toks),
        # Straight from the rows (they carry the model's attribute names): an instance with
        # 1,000 leases would spend tens of milliseconds building ORM objects to read them.
        leases=tuple(lease_view(cast(m.Lease, r)) for r in leases),
    )


async def mark_tokens_revoked(
    conn: AsyncConnection, clock: Clock, accessors: Sequence[str]
) -> None:
    """One update for the instance's tokens, an ``instance.token_revoked`` event for each
    token it moved."""
    if not accessors:
        return
    instance_ids = (
        (
            await conn.execute(
                update(m.InstanceToken)
                .where(
                    m.InstanceToken.accessor.in_(list(accessors)),
                    m.InstanceToken.revoked_at.is_(None),
                )
                .values(revoked_at=clock.now())
                .returning(m.InstanceToken.instance_id)
            )
        )
        .scalars()
        .all()
    )
    for instance_id in instance_ids:
        await audit(conn, clock, "revocation", "instance.token_revoked", instance_id=instance_id)


async def mark_leases_ended(
    conn: AsyncConnection,
    clock: Clock,
    lease_ids: Sequence[str],
    state: LeaseState,
    *,
    actor: str,
    now: datetime,
    stamped_only: bool = False,
) -> int:
    """``stamped_only``: only leases a revocation of ours covers (``revoke_sent_at`` set)
    move; the others stay as they are (a guard under the worker's own bookkeeping)."""
    sources = [old.value for old in LIVE_LEASE_STATES if lease_can_move(old, state)]
    moved: dict[str, list[str]] = {}
    stamped = m.Lease.revoke_sent_at.is_not(None) if stamped_only else true()
    for chunk_start in range(0, len(lease_ids), 500):
        chunk = list(lease_ids[chunk_start : chunk_start + 500])
        rows = await conn.execute(
            update(m.Lease)
            .where(m.Lease.lease_id.in_(chunk), m.Lease.state.in_(sources), stamped)
            .values(state=state.value, ended_at=now, updated_at=now)
            .returning(m.Lease.lease_id, m.Lease.instance_id)
        )
        for lease_id, instance_id in rows:
            moved.setdefault(instance_id, []).append(lease_id)
    for instance_id, ids in sorted(moved.items()):
        await audit(
            conn,
            clock,
            actor,
            f"leases.{state.value}",
            instance_id=instance_id,
            count=len(ids),
            lease_ids=sorted(ids)[:AUDIT_MAX_IDS],
        )
    return sum(len(ids) for ids in moved.values())


async def record_confirmed(
    conn: AsyncConnection,
    clock: Clock,
    instance_id: str,
    *,
    tokens: Sequence[str] = (),
    revoked: Sequence[str] = (),
    actor: str,
) -> int:
    """Lock the instance row, record what a pass confirmed (``tokens`` revoked, leases
    ``revoked``) and return how many leases of the instance are still live: with the row
    locked, no request can complete a lease between this count and the job's end."""
    await lock_instance(conn, instance_id)
    await mark_tokens_revoked(conn, clock, tokens)
    if revoked:
        moved = await mark_leases_ended(
            conn,
            clock,
            revoked,
            LeaseState.REVOKED,
            actor=actor,
            now=clock.now(),
            stamped_only=True,
        )
        if moved < len(revoked):  # ended meanwhile by another path, or held by the guard
            log.info(
                "some leases a revocation pass confirmed gone were not recorded revoked",
                extra={"instance_id": instance_id, "confirmed": len(revoked), "moved": moved},
            )
    return int(
        (
            await conn.execute(
                select(func.count()).where(
                    m.Lease.instance_id == instance_id, m.Lease.state.in_(LIVE)
                )
            )
        ).scalar_one()
    )


async def superseded_leases(conn: AsyncConnection, cutoff: datetime, limit: int) -> list[LeaseView]:
    rows = (
        await conn.execute(
            select(m.Lease)
            .where(m.Lease.state == LeaseState.REVOKING.value, m.Lease.updated_at < cutoff)
            .order_by(m.Lease.updated_at)
            .limit(limit)
        )
    ).all()
    return [lease_view(m.Lease(**r._mapping)) for r in rows]
