"""The checkpoint writer: a periodic part that signs the chain's head when a checkpoint
is due (``every_events`` events since the last one, or ``every`` elapsed with any event
since), records it in ``audit_checkpoints``, writes it as one log line
(``audit.checkpoint``) and appends it to the external checkpoint file (fsynced).

Only one replica checkpoints at a time (``try_exclusive``); the others skip the tick. A
signer that fails (Vault sealed, the key missing) is logged and retried at the next tick:
the broker goes on serving, and the checkpoint's age (a metric) tells the operator.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from broker.audit.checkpoint import Checkpoint, document, due, file_line, message
from broker.audit.settings import CheckpointSettings
from broker.audit.signers import CheckpointSigner
from broker.clock import Clock
from broker.errors import BrokerError

log = logging.getLogger(__name__)
LOCK_KEY = "audit-checkpoint"


class CheckpointLedger(Protocol):
    def try_exclusive(self, key: str) -> AbstractAsyncContextManager[bool]: ...

    async def head(self) -> tuple[int, str]: ...

    async def last_checkpoint(self) -> Checkpoint | None: ...

    async def add_checkpoint(self, checkpoint: Checkpoint) -> bool: ...


def append_line(path: Path, line: str) -> None:
    """Append one line and fsync it: the file is the record outside the database."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriter:
    def __init__(
        self,
        settings: CheckpointSettings,
        ledger: CheckpointLedger,
        signer: CheckpointSigner,
        clock: Clock,
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._signer = signer
        self._clock = clock
        self._every = timedelta(seconds=settings.every)
        # The newest checkpoint this replica has seen (written by any replica), and the
        # signing failures in a row: what the metrics report.
        self.last: Checkpoint | None = None
        self.failures = 0

    @property
    def last_seq(self) -> int:
        return self.last.seq if self.last else 0

    def age_s(self, now: datetime | None = None) -> float | None:
        if self.last is None:
            return None
        return ((now or self._clock.now()) - self.last.at).total_seconds()

    async def run_once(self) -> Checkpoint | None:
        """Write a checkpoint if one is due and no other replica is at it; the one
        written, or None."""
        async with self._ledger.try_exclusive(LOCK_KEY) as mine:
            if not mine:
                return None
            return await self._checkpoint()

    async def _checkpoint(self) -> Checkpoint | None:
        last = await self._ledger.last_checkpoint()
        if last is not None:
            self.last = last
        seq, head_hash = await self._ledger.head()
        now = self._clock.now()
        if not due(
            head_seq=seq,
            last_seq=last.seq if last else 0,
            last_at=last.at if last else None,
            now=now,
            every_events=self._settings.every_events,
            every=self._every,
        ):
            return None
        try:
            signer, key_id, signature = await self._signer.sign(message(seq, head_hash, now))
        except BrokerError as exc:
            self.failures += 1
            log.error(
                "could not sign an audit checkpoint; retrying at the next tick",
                extra={"code": exc.code, "error": exc.message, "seq": seq},
            )
            return None
        self.failures = 0
        checkpoint = Checkpoint(seq, head_hash, now, signer, key_id, signature)
        if not await self._ledger.add_checkpoint(checkpoint):
            return None  # another replica checkpointed this head meanwhile
        self.last = checkpoint
        log.info("audit.checkpoint", extra={"checkpoint": document(checkpoint)})
        if self._settings.file is not None:
            try:
                await asyncio.to_thread(append_line, self._settings.file, file_line(checkpoint))
            except OSError as exc:
                log.error(
                    "could not append the audit checkpoint to its file",
                    extra={"file": str(self._settings.file), "error": exc.strerror, "seq": seq},
                )
        return checkpoint
