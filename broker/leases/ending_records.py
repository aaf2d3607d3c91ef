"""The ledger of ``broker.leases.ending.LeaseEnder``: ``revoke_sent_at`` and the recorded
ending of a lease Vault does not know; and an operator's marker on a lost lease they ended
by hand (``resolve_lost``). Each one transaction."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from broker.clock import Clock
from broker.leases.database import Database
from broker.leases.ending import Ending
from broker.leases.sql import ending as sql
from broker.leases.views import LeaseView


class EndingRecords:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    async def mark_revoke_sent(self, lease_ids: Sequence[str], at: datetime) -> int:
        """Committed before the first revocation covering these leases is sent."""
        if not lease_ids:
            return 0
        async with self._db.transaction() as conn:
            return await sql.mark_revoke_sent(conn, self._clock, lease_ids, at=at)

    async def clear_revoke_sent(self, lease_ids: Sequence[str], at: datetime) -> int:
        """Take back the stamp ``at`` when its revocation certainly did not take effect."""
        if not lease_ids:
            return 0
        async with self._db.transaction() as conn:
            return await sql.clear_revoke_sent(conn, self._clock, lease_ids, at=at)

    async def end_decided(
        self,
        lease: LeaseView,
        ending: Ending,
        *,
        actor: str,
        engine: str | None,
        found_by: str,
        why: str,
    ) -> bool:
        async with self._db.transaction() as conn:
            return await sql.end_decided(
                conn,
                self._clock,
                lease,
                ending,
                actor=actor,
                engine=engine,
                found_by=found_by,
                why=why,
            )

    async def resolve_lost(
        self, lease_id: str, *, actor: str, reason: str, incident: str | None
    ) -> tuple[LeaseView, bool]:
        """Mark a lost lease resolved, with its audit event; the lease, and whether this
        call marked it (False: resolved before). Raises ``NotFound``, ``LeaseNotLost``."""
        async with self._db.transaction() as conn:
            return await sql.resolve_lost(
                conn, self._clock, lease_id, actor=actor, reason=reason, incident=incident
            )


__all__ = ["EndingRecords"]
