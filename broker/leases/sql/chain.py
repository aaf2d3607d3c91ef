"""The audit chain's reads, for its verification: events in seq order, page by page,
the checkpoints and the head."""

from __future__ import annotations

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.leases import models as m
from broker.leases.views import AuditEventView, CheckpointView

_E = m.AuditEvent
_PAGE = (
    select(
        _E.id,
        _E.seq,
        _E.at,
        _E.actor,
        _E.action,
        _E.instance_id,
        _E.lease_id,
        _E.outcome,
        _E.reason,
        _E.detail,
        _E.prev_hash,
        _E.hash,
    )
    .where(_E.seq > bindparam("b_after"), _E.seq <= bindparam("b_upto"))
    .order_by(_E.seq)
    .limit(bindparam("b_limit"))
)


async def events_page(
    conn: AsyncConnection, *, after: int, upto: int, limit: int
) -> list[AuditEventView]:
    rows = await conn.execute(_PAGE, {"b_after": after, "b_upto": upto, "b_limit": limit})
    return [
        AuditEventView(
            row_id=r.id,
            seq=r.seq,
            at=r.at,
            actor=r.actor,
            action=r.action,
            instance_id=r.instance_id,
            lease_id=r.lease_id,
            outcome=r.outcome,
            reason=r.reason,
            detail=dict(r.detail or {}),
            prev_hash=r.prev_hash,
            hash=r.hash,
        )
        for r in rows
    ]


async def event_hash(conn: AsyncConnection, seq: int) -> str | None:
    return (await conn.execute(select(_E.hash).where(_E.seq == seq))).scalar()


async def checkpoints(conn: AsyncConnection) -> list[CheckpointView]:
    c = m.AuditCheckpoint
    rows = await conn.execute(
        select(c.seq, c.hash, c.at, c.signer, c.key_id, c.signature).order_by(c.seq)
    )
    return [CheckpointView(r.seq, r.hash, r.at, r.signer, r.key_id, r.signature) for r in rows]
