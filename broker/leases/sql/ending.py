"""The SQL of ending a lease Vault does not know (``broker.leases.ending``): when the
broker first sent a revocation, and the decided ending with its audit event; and an
operator's marker on a lost lease they ended by hand (``resolve_lost``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.clock import Clock
from broker.errors import LeaseNotLost
from broker.leases import models as m
from broker.leases.ending import Ending
from broker.leases.resolution import Resolving, not_lost_message, resolving
from broker.leases.sql.common import audit, iso
from broker.leases.sql.issuance import get_lease
from broker.leases.states import LIVE_LEASE_STATES, LeaseState, lease_can_move
from broker.leases.views import LeaseView


async def mark_revoke_sent(
    conn: AsyncConnection, clock: Clock, lease_ids: Sequence[str], *, at: datetime | None = None
) -> int:
    """Stamp ``revoke_sent_at`` (``at``, default now) on the live leases that have none;
    how many were stamped. Kept once set: the first revocation is what makes Vault's
    silence ours (unless that revocation certainly failed: ``clear_revoke_sent``)."""
    now = clock.now()
    stamped = 0
    for start in range(0, len(lease_ids), 500):
        chunk = list(lease_ids[start : start + 500])
        res = await conn.execute(
            update(m.Lease)
            .where(
                m.Lease.lease_id.in_(chunk),
                m.Lease.revoke_sent_at.is_(None),
                m.Lease.state.in_([s.value for s in LIVE_LEASE_STATES]),
            )
            .values(revoke_sent_at=at or now, updated_at=now)
        )
        stamped += res.rowcount or 0
    return stamped


async def clear_revoke_sent(
    conn: AsyncConnection, clock: Clock, lease_ids: Sequence[str], *, at: datetime
) -> int:
    """Clear ``revoke_sent_at`` where it is still the stamp ``at`` (another path's stamp
    stays): the revocation it announced certainly did not take effect."""
    now = clock.now()
    cleared = 0
    for start in range(0, len(lease_ids), 500):
        chunk = list(lease_ids[start : start + 500])
        res = await conn.execute(
            update(m.Lease)
            .where(m.Lease.lease_id.in_(chunk), m.Lease.revoke_sent_at == at)
            .values(revoke_sent_at=None, updated_at=now)
        )
        cleared += res.rowcount or 0
    return cleared


async def end_decided(
    conn: AsyncConnection,
    clock: Clock,
    lease: LeaseView,
    ending: Ending,
    *,
    actor: str,
    engine: str | None,
    found_by: str,
    why: str,
) -> bool:
    """Move the lease to the decided state (only from a live state that may lead there)
    and write its event: ``lease.lost`` with what an operator needs to end the credential
    by hand, or ``lease.<state>`` saying Vault did not know it. False if it had ended, or
    (for ``lost``) if a revocation was sent for it meanwhile."""
    now = clock.now()
    state = ending.state
    sources = [s.value for s in LIVE_LEASE_STATES if lease_can_move(s, state)]
    guard = [m.Lease.lease_id == lease.lease_id, m.Lease.state.in_(sources)]
    if state is LeaseState.LOST:
        # Decided from a view read before the lookup: a revocation another path sent since
        # (its revoke_sent_at is committed before it is sent) makes Vault's silence ours.
        guard.append(m.Lease.revoke_sent_at.is_(None))
    row = (
        await conn.execute(
            update(m.Lease)
            .where(*guard)
            .values(state=state.value, ended_at=now, updated_at=now)
            .returning(m.Lease.lease_id)
        )
    ).first()
    if row is None:
        return False
    detail: dict[str, Any] = {
        "workload": lease.workload,
        "role": lease.role,
        "engine": engine,
        "vault_lease_id": lease.vault_lease_id,
        "vault_path": lease.vault_path,
        "credential_ref": lease.credential_ref,
        "found_by": found_by,
        "vault_knew": False,
    }
    if ending.confirmed_by is not None:
        detail["confirmed_by"] = ending.confirmed_by
    if state is LeaseState.LOST:
        detail["why"] = why
    await audit(
        conn,
        clock,
        actor,
        f"lease.{state.value}",
        instance_id=lease.instance_id,
        lease_id=lease.lease_id,
        outcome="lost" if state is LeaseState.LOST else "ok",
        reason="Vault no longer knew the lease before the broker revoked it"
        if state is LeaseState.LOST
        else None,
        **detail,
    )
    return True


async def resolve_lost(
    conn: AsyncConnection,
    clock: Clock,
    lease_id: str,
    *,
    actor: str,
    reason: str,
    incident: str | None,
) -> tuple[LeaseView, bool]:
    """Mark a lost lease resolved (``broker.leases.resolution``): who, when, why and the
    incident on the lease, and its ``lease.resolved`` event, in the caller's transaction.
    Returns the lease as it is now, and whether this call marked it (False: resolved
    before, the first marker stands). Raises ``NotFound`` (``lease_not_found``) and
    ``LeaseNotLost``."""
    now = clock.now()
    lease = await get_lease(conn, lease_id)
    sources = [s.value for s in LeaseState if lease_can_move(s, LeaseState.RESOLVED)]
    # Twice at most: a lease still revoking when the guard looked may have become lost by
    # the time it is read again; then it is marked as asked.
    for _ in range(2):
        moved = (
            await conn.execute(
                update(m.Lease)
                .where(m.Lease.lease_id == lease_id, m.Lease.state.in_(sources))
                .values(
                    state=LeaseState.RESOLVED.value,
                    resolved_at=now,
                    resolved_by=actor[:128],
                    resolved_reason=reason[:200],
                    resolved_incident=incident,
                    updated_at=now,
                )
                .returning(m.Lease.lease_id)
            )
        ).first()
        if moved is not None:
            break
        # Read again: the state the guard saw (another operator may have just marked it).
        lease = await get_lease(conn, lease_id)
        decision = resolving(LeaseState(lease.state))
        if decision is Resolving.ALREADY:
            return lease, False
        if decision is Resolving.REFUSE:
            raise LeaseNotLost(not_lost_message(LeaseState(lease.state)))
    else:
        raise LeaseNotLost("the lease changed while it was being marked: try again")
    said = {"incident": incident} if incident else {}
    await audit(
        conn,
        clock,
        actor,
        "lease.resolved",
        instance_id=lease.instance_id,
        lease_id=lease_id,
        reason=reason,
        workload=lease.workload,
        role=lease.role,
        kind=lease.kind,
        vault_lease_id=lease.vault_lease_id,
        vault_path=lease.vault_path,
        credential_ref=lease.credential_ref,
        lost_at=iso(lease.ended_at),
        **said,
    )
    return await get_lease(conn, lease_id), True
