"""The checkpoint writer: a periodic part that signs the chain's head when a checkpoint
is due (``every_events`` events since the last one, or ``every`` elapsed with any event
since), records it in ``audit_checkpoints``, writes it as one log line
(``audit.checkpoint``) and appends it to the external checkpoint file (fsynced).

Only one replica checkpoints at a time (``try_exclusive``); the others skip the tick. A
signer that fails (Vault sealed, the key missing) is logged and retried at the next tick:
the broker goes on serving, and the checkpoint's age (a metric) tells the operator.

A checkpoint vouches for the chain, so the writer signs only a head it has recomputed
from a trusted anchor (``CheckpointWriter``): the database, which someone may write to,
is not trusted to say which checkpoint is the last or that the events after it hold.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from broker.audit.checkpoint import Checkpoint, document, due, file_line, message
from broker.audit.settings import CheckpointSettings
from broker.audit.verify import recompute
from broker.clock import Clock
from broker.errors import BrokerError
from broker.leases import AuditEventView, AuditSelection
from broker.leases.chain import GENESIS

log = logging.getLogger(__name__)
LOCK_KEY = "audit-checkpoint"
PAGE = 1000
# Stored checkpoints past the trusted one whose signatures are tried (newest first), and
# pages of them read at most in one tick; a stored checkpoint may be dated this much
# after this replica's clock (replicas' clocks a little apart).
_CANDIDATES = 64
_MAX_PAGES = 1000
_SKEW = timedelta(minutes=5)


class CheckpointLedger(Protocol):
    def try_exclusive(self, key: str) -> AbstractAsyncContextManager[bool]: ...

    async def head(self) -> tuple[int, str]: ...

    async def checkpoints(self, *, after: int = 0, limit: int = 1000) -> list[Checkpoint]: ...

    async def events(
        self, selection: AuditSelection, *, after: int = 0, limit: int = 100, newest: bool = False
    ) -> list[AuditEventView]: ...

    async def hashes_at(self, seqs: Sequence[int]) -> dict[int, str]: ...

    async def add_checkpoint(self, checkpoint: Checkpoint) -> bool: ...


class CheckpointKey(Protocol):
    """Signs checkpoints, and tells its own signatures (``CheckpointSigning``)."""

    async def sign(self, message: bytes) -> tuple[str, str, str]: ...

    async def check(self, checkpoint: Checkpoint) -> bool | None: ...


def append_line(path: Path, line: str) -> None:
    """Append one line and fsync it: the file is the record outside the database."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


class ChainBroken(Exception):
    """The chain from the trusted anchor to the head does not hold: the writer will not
    sign it. ``seq``: where it stops holding."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(reason)
        self.seq = seq
        self.reason = reason


class CheckpointWriter:
    """Signs only a head it has checked: the events from its anchor up to the head must
    link and hash right. The anchor is the newest of: the head this process last checked
    (kept in memory, so events it has seen cannot be rewritten and then signed), and the
    newest checkpoint whose signature this key verifies. A stored checkpoint ahead of the
    head or of the clock, or whose signature does not verify, is ignored and alerted
    (``ignored``): it never stops checkpointing. A chain that does not hold is never
    signed (``refusals``, and an error logged every tick until someone looks)."""

    def __init__(
        self,
        settings: CheckpointSettings,
        ledger: CheckpointLedger,
        signer: CheckpointKey,
        clock: Clock,
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._signer = signer
        self._clock = clock
        self._every = timedelta(seconds=settings.every)
        # The newest trusted checkpoint (signed here, or by any replica with a signature
        # that verifies), and the newest head this process checked: (seq, hash).
        self.last: Checkpoint | None = None
        self._checked: tuple[int, str] | None = None
        self._warned = False
        # Signing failures in a row, and ticks in a row that refused a chain that does
        # not hold (with ``ignored``): what the metrics report.
        self.failures = 0
        self.refusals = 0
        self._ignored: set[int] = set()  # seqs of stored checkpoints ignored
        self._pending: deque[Checkpoint] = deque(maxlen=_CANDIDATES)  # not checked yet
        self._scanned = 0  # stored checkpoints up to this seq were read

    @property
    def last_seq(self) -> int:
        return self.last.seq if self.last else 0

    def age_s(self, now: datetime | None = None) -> float | None:
        if self.last is None:
            return None
        return max(0.0, ((now or self._clock.now()) - self.last.at).total_seconds())

    async def run_once(self) -> Checkpoint | None:
        """Write a checkpoint if one is due and no other replica is at it; the one
        written, or None."""
        if not self._warned:
            self._warned = True
            if self._settings.file is None:
                log.warning(
                    "audit.checkpoint.file is not set: checkpoints live only in the database "
                    "(and the log). Someone with write access to it can delete them and "
                    "rewrite the audit chain; set a file on storage the database cannot "
                    "reach, or keep the audit.checkpoint log lines in an append-only sink"
                )
        async with self._ledger.try_exclusive(LOCK_KEY) as mine:
            if not mine:
                return None
            return await self._checkpoint()

    async def _checkpoint(self) -> Checkpoint | None:
        seq, head_hash = await self._ledger.head()
        now = self._clock.now()
        candidate = await self._newest_trusted(seq, now)
        try:
            await self._check_chain(seq, head_hash, candidate)
        except ChainBroken as broken:
            self.refusals += 1
            log.error(
                "the audit chain does not hold: not signing it (run brokerctl audit verify)",
                extra={"seq": broken.seq, "reason": broken.reason, "head_seq": seq},
            )
            return None
        self.refusals = 0
        self._checked = (seq, head_hash)
        if candidate is not None:
            self.last = candidate
        last = self.last
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

    async def _newest_trusted(self, head_seq: int, now: datetime) -> Checkpoint | None:
        """The newest stored checkpoint past ``last`` whose signature verifies. Those
        that cannot be genuine are ignored and alerted; those that cannot be checked now
        (Vault unreachable) are tried again at the next tick."""
        after = max(self.last_seq, self._scanned)
        for _ in range(_MAX_PAGES):  # bounded: each page moves ``after`` forward
            page = await self._ledger.checkpoints(after=after, limit=PAGE)
            for cp in page:
                if cp.seq > head_seq:
                    self._ignore(cp, "it is ahead of the chain's head", head_seq)
                    continue
                self._scanned = cp.seq
                if cp.at > now + _SKEW:
                    self._ignore(cp, "it is dated in the future", head_seq)
                else:
                    self._pending.append(cp)
            if len(page) < PAGE:
                break
            after = page[-1].seq
        for cp in sorted(self._pending, key=lambda c: c.seq, reverse=True):
            if cp.seq <= self.last_seq:
                self._pending.remove(cp)
                continue
            verdict = await self._signer.check(cp)
            if verdict:
                return cp
            if verdict is False:
                self._pending.remove(cp)
                self._ignore(cp, "its signature does not verify", head_seq)
        return None

    def _ignore(self, cp: Checkpoint, why: str, head_seq: int) -> None:
        if cp.seq in self._ignored:
            return
        self._ignored.add(cp.seq)
        log.error(
            "ignoring a stored audit checkpoint that cannot be genuine",
            extra={"seq": cp.seq, "reason": why, "key_id": cp.key_id, "head_seq": head_seq},
        )

    @property
    def ignored(self) -> int:
        """Stored checkpoints ignored since start (forged, or signed by another key)."""
        return len(self._ignored)

    async def _check_chain(
        self, head_seq: int, head_hash: str, candidate: Checkpoint | None
    ) -> None:
        """Recompute the events from the anchor to the head (``ChainBroken`` if they do
        not hold): the anchor's event must still have its hash, each event after it must
        hash right and link to the one before, and the last one must be the head. The
        anchor is what this process knows (its last checkpoint, the head it checked last);
        a newly stored ``candidate`` must name the hash the chain holds at its seq, and is
        the anchor only of a process that knows nothing yet (else a replica that signed
        a forged head would launder it for this one)."""
        anchors = [(0, GENESIS)]
        if self.last is not None:
            anchors.append((self.last.seq, self.last.hash))
        if self._checked is not None:
            anchors.append(self._checked)
        if len(anchors) == 1 and candidate is not None:
            anchors.append((candidate.seq, candidate.hash))
        anchor_seq, anchor_hash = max(anchors)
        if head_seq < anchor_seq:
            raise ChainBroken(head_seq, f"the head went back from seq {anchor_seq} to {head_seq}")
        prev_seq, prev_hash = anchor_seq, anchor_hash
        after = max(anchor_seq - 1, 0)
        everything = AuditSelection()
        seen_anchor = anchor_seq == 0
        for _ in range((head_seq - after) // PAGE + 2):  # bounded: each page moves forward
            page = await self._ledger.events(everything, after=after, limit=PAGE)
            for event in page:
                if event.seq > head_seq:
                    break  # appended since the head was read: the next tick's
                if event.seq == anchor_seq:
                    if event.hash != anchor_hash:
                        raise ChainBroken(event.seq, "the event checked before was rewritten")
                    seen_anchor = True
                    continue
                if not seen_anchor:
                    raise ChainBroken(anchor_seq, "the event checked before is missing")
                if event.seq != prev_seq + 1:
                    raise ChainBroken(prev_seq + 1, "events are missing")
                if event.prev_hash != prev_hash:
                    raise ChainBroken(event.seq, "it does not link to the event before it")
                if recompute(event) != event.hash:
                    raise ChainBroken(event.seq, "it does not match its hash")
                prev_seq, prev_hash = event.seq, event.hash
            if len(page) < PAGE or page[-1].seq >= head_seq:
                break
            after = page[-1].seq
        if not seen_anchor:
            raise ChainBroken(anchor_seq, "the event checked before is missing")
        if (prev_seq, prev_hash) != (head_seq, head_hash):
            raise ChainBroken(prev_seq, "the chain's head row does not match its last event")
        if candidate is not None and candidate.seq != anchor_seq:
            stored = (await self._ledger.hashes_at([candidate.seq])).get(candidate.seq)
            if stored != candidate.hash:
                raise ChainBroken(
                    candidate.seq,
                    "a signed checkpoint names another hash: the chain was rewritten, or "
                    "another replica signed a forged head",
                )
