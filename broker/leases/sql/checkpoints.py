"""The audit trail's SQL besides appending (``common.audit``): the chain head, signed
checkpoints, and listings of events by selector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from sqlalchemy import Table, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.leases import models as m
from broker.leases.sql.common import AUDIT_HEAD
from broker.leases.views import AuditEventView, AuditSelection, CheckpointView

CHECKPOINTS = cast(Table, m.AuditCheckpoint.__table__)


async def head(conn: AsyncConnection) -> tuple[int, str]:
    """(seq, hash) of the newest event; (0, genesis) before the first."""
    row = (
        await conn.execute(select(AUDIT_HEAD.c.seq, AUDIT_HEAD.c.hash).where(AUDIT_HEAD.c.id == 1))
    ).one()
    return int(row[0]), str(row[1])


def _checkpoint(r: m.AuditCheckpoint) -> CheckpointView:
    return CheckpointView(r.seq, r.hash, r.at, r.signer, r.key_id, r.signature)


async def last_checkpoint(conn: AsyncConnection) -> CheckpointView | None:
    row = (
        await conn.execute(
            select(m.AuditCheckpoint).order_by(m.AuditCheckpoint.seq.desc()).limit(1)
        )
    ).first()
    return _checkpoint(m.AuditCheckpoint(**row._mapping)) if row else None


async def add_checkpoint(conn: AsyncConnection, cp: CheckpointView) -> None:
    await conn.execute(
        CHECKPOINTS.insert().values(
            seq=cp.seq,
            hash=cp.hash,
            at=cp.at,
            signer=cp.signer,
            key_id=cp.key_id,
            signature=cp.signature,
        )
    )


async def list_checkpoints(
    conn: AsyncConnection, *, after: int, limit: int
) -> list[CheckpointView]:
    rows = (
        await conn.execute(
            select(m.AuditCheckpoint)
            .where(m.AuditCheckpoint.seq > after)
            .order_by(m.AuditCheckpoint.seq)
            .limit(limit)
        )
    ).all()
    return [_checkpoint(m.AuditCheckpoint(**r._mapping)) for r in rows]


def _event(r: m.AuditEvent) -> AuditEventView:
    return AuditEventView(
        r.id,
        r.seq,
        r.at,
        r.actor,
        r.action,
        r.instance_id,
        r.lease_id,
        r.outcome,
        r.reason,
        dict(r.detail or {}),
        r.prev_hash,
        r.hash,
    )


async def list_events(
    conn: AsyncConnection,
    selection: AuditSelection,
    *,
    after: int,
    limit: int,
    newest: bool = False,
) -> list[AuditEventView]:
    """Events past ``after`` (a seq) that match, oldest first: the first ``limit`` of
    them, or with ``newest`` the last ``limit`` (a tail)."""
    e = m.AuditEvent
    stmt = select(e).where(e.seq > after)
    for col, value in (
        (e.instance_id, selection.instance),
        (e.lease_id, selection.lease),
        (e.action, selection.action),
    ):
        if value is not None:
            stmt = stmt.where(col == value)
    if selection.actor is not None:
        # An actor or every actor of its kind: ``operator`` finds ``operator:alice`` too,
        # ``revocation`` every revocation worker's events.
        kind = selection.actor.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = stmt.where(
            or_(e.actor == selection.actor, e.actor.like(kind + ":%", escape="\\"))
        )
    if selection.since is not None:
        stmt = stmt.where(e.at >= selection.since)
    if selection.workload is not None:
        of_workload = select(m.Instance.instance_id).where(
            m.Instance.workload == selection.workload
        )
        stmt = stmt.where(e.instance_id.in_(of_workload))
    if selection.role is not None:
        of_role = select(m.Lease.lease_id).where(m.Lease.role == selection.role)
        stmt = stmt.where(e.lease_id.in_(of_role))
    order = e.seq.desc() if newest else e.seq
    rows = (await conn.execute(stmt.order_by(order).limit(limit))).all()
    found = [_event(e(**r._mapping)) for r in rows]
    return found[::-1] if newest else found


async def hashes_at(conn: AsyncConnection, seqs: Sequence[int]) -> dict[int, str]:
    """The stored hashes of these events, 500 seqs a statement (bounded parameters)."""
    e, found = m.AuditEvent, dict[int, str]()
    for start in range(0, len(seqs), 500):
        chunk = list(seqs[start : start + 500])
        rows = (await conn.execute(select(e.seq, e.hash).where(e.seq.in_(chunk)))).all()
        found |= {int(r[0]): str(r[1]) for r in rows}
    return found


async def last_event_seq(conn: AsyncConnection) -> int:
    """The newest stored event's seq (0: none), whatever the head row says."""
    return int((await conn.execute(select(func.max(m.AuditEvent.seq)))).scalar() or 0)
