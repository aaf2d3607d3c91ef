"""What the ledger suites share: the start of their clock, every ledger on one database,
and short ways to write a lease."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from broker.leases import Ledgers
from broker.leases import models as m

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)




async def audit_events(s: Ledgers, instance_id: str) -> list[dict[str, Any]]:
    """The instance's audit trail, oldest first (the broker itself only writes it)."""
    query = (
        select(m.AuditEvent.action, m.AuditEvent.detail)
        .where(m.AuditEvent.instance_id == instance_id)
        .order_by(m.AuditEvent.id)
    )
    async with s.database.transaction(readonly=True) as conn:
        return [dict(r._mapping) for r in (await conn.execute(query)).all()]


async def issue(s: Ledgers, instance: str, role: str = "r") -> str:
    ticket = await s.issuance.begin_issue(
        instance_id=instance, issuer_name="dev", workload="w", role=role, kind="k"
    )
    return ticket.lease_id


async def complete(s: Ledgers, lease_id: str) -> None:
    await s.issuance.complete_issue(
        lease_id,
        vault_lease_id=f"v/{lease_id}",
        accessor="acc",
        renewable=True,
        issued_at=T0,
        expires_at=T0,
    )
