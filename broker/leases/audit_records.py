"""The audit's ledgers: the trail read out and its signed checkpoints
(``AuditRecords``), and the chain as its verification reads it (``ChainRecords``). Each
method is one transaction on the ``Database`` running the SQL of ``broker.leases.sql``."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager

from sqlalchemy.exc import IntegrityError

from broker.leases.database import Database
from broker.leases.sql import chain, checkpoints
from broker.leases.views import AuditEventView, AuditSelection, CheckpointView


class AuditRecords:
    """The audit trail read out, and its signed checkpoints (the checkpoint writer, the
    audit listing)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def try_exclusive(self, key: str) -> AbstractAsyncContextManager[bool]:
        return self._db.try_exclusive(key)  # one replica checkpoints at a time

    async def head(self) -> tuple[int, str]:
        async with self._db.transaction(readonly=True) as conn:
            return await checkpoints.head(conn)

    async def last_checkpoint(self) -> CheckpointView | None:
        async with self._db.transaction(readonly=True) as conn:
            return await checkpoints.last_checkpoint(conn)

    async def add_checkpoint(self, checkpoint: CheckpointView) -> bool:
        """Record a checkpoint; False if one of that seq is there already (another replica
        wrote it: only on SQLite, where ``try_exclusive`` does not exclude processes)."""
        try:
            async with self._db.transaction() as conn:
                await checkpoints.add_checkpoint(conn, checkpoint)
        except IntegrityError:
            return False
        return True

    async def checkpoints(self, *, after: int = 0, limit: int = 1000) -> list[CheckpointView]:
        async with self._db.transaction(readonly=True) as conn:
            return await checkpoints.list_checkpoints(conn, after=after, limit=limit)

    async def table_end(self) -> int:
        """The newest stored event's seq (0: none), read from the events themselves."""
        async with self._db.transaction(readonly=True) as conn:
            return await checkpoints.last_event_seq(conn)

    async def hashes_at(self, seqs: Sequence[int]) -> dict[int, str]:
        """The stored hash of each of these events the table holds."""
        async with self._db.transaction(readonly=True) as conn:
            return await checkpoints.hashes_at(conn, seqs)

    async def events(
        self, selection: AuditSelection, *, after: int = 0, limit: int = 100, newest: bool = False
    ) -> list[AuditEventView]:
        """Events after seq ``after`` matching ``selection``, oldest first: the first
        ``limit``, or with ``newest`` the last ``limit``."""
        async with self._db.transaction(readonly=True) as conn:
            return await checkpoints.list_events(
                conn, selection, after=after, limit=limit, newest=newest
            )


class ChainRecords:
    """The audit chain as its verification reads it. Each read is its own (read-only)
    transaction: a verification of a long chain holds no lock and no snapshot for long."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def head(self) -> tuple[int, str]:
        """(seq, hash) of the chain's head row."""
        async with self._db.transaction(readonly=True) as conn:
            return await checkpoints.head(conn)

    async def checkpoints(self) -> list[CheckpointView]:
        async with self._db.transaction(readonly=True) as conn:
            return await chain.checkpoints(conn)

    async def event_hash(self, seq: int) -> str | None:
        async with self._db.transaction(readonly=True) as conn:
            return await chain.event_hash(conn, seq)

    async def events_page(self, *, after: int, upto: int, limit: int) -> list[AuditEventView]:
        """Events with ``after < seq <= upto``, in seq order, at most ``limit``."""
        async with self._db.transaction(readonly=True) as conn:
            return await chain.events_page(conn, after=after, upto=upto, limit=limit)


__all__ = ["AuditRecords", "ChainRecords"]
