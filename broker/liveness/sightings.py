"""When instances were last seen: noted in memory on each exchange and renewal, written to
the store in one statement per flush (every few seconds), so that the hot path pays no
extra write. Losing the notes of a crashed replica costs at most one flush interval of
recency, which ``unseen_grace`` (a minute at least) absorbs."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

MAX_PENDING = 200_000  # past this, new notes wait for the next flush (never unbounded)


class SeenRecorder(Protocol):
    async def mark_seen(self, instance_ids: list[str], at: datetime) -> None: ...


class Sightings:
    def __init__(self) -> None:
        self._pending: set[str] = set()

    def note(self, instance_id: str) -> None:
        if len(self._pending) < MAX_PENDING:
            self._pending.add(instance_id)

    def __len__(self) -> int:
        return len(self._pending)

    async def flush(self, store: SeenRecorder, at: datetime) -> int:
        """Write the pending sightings; on failure they stay pending for the next flush."""
        if not self._pending:
            return 0
        batch, self._pending = self._pending, set()
        try:
            await store.mark_seen(sorted(batch), at)
        except BaseException:
            self._pending |= batch
            raise
        return len(batch)
