"""Verification of the stored audit chain: reads it page by page through its ledger and
hands each page to the pure verifier (``broker.audit.verify``).

Checkpoints come from the store's table and, where configured, from outside the database
(``external``: the file or log the signer also writes), and from the caller (``collected``:
the checkpoints of every replica an operator gathered), so a table truncated together with
its checkpoints is still caught. Signatures are checked by an injected ``check_signature``
(the checkpoint signer's); without one the report says they were not checked. Given a
``clock`` and ``max_uncovered`` (``checkpoint.uncovered_limit`` of the configured
interval), events older than that which no checkpoint covers are a finding.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Protocol

from broker.audit.verify import Report, Verifier
from broker.clock import Clock
from broker.errors import BadRequest
from broker.leases import AuditEventView, CheckpointView

PAGE = 1000


class ChainLedger(Protocol):
    """What verification reads of the store (``ChainRecords``)."""

    async def head(self) -> tuple[int, str]: ...

    async def checkpoints(self) -> list[CheckpointView]: ...

    async def event_hash(self, seq: int) -> str | None: ...

    async def events_page(self, *, after: int, upto: int, limit: int) -> list[AuditEventView]: ...


# True: verifies; False: does not; None: cannot be checked now (Vault unreachable).
SignatureCheck = Callable[[CheckpointView], Awaitable[bool | None]]
ExternalCheckpoints = Callable[[], Awaitable[Sequence[CheckpointView]]]


class AuditVerification:
    def __init__(
        self,
        ledger: ChainLedger,
        *,
        check_signature: SignatureCheck | None = None,
        external_checkpoints: ExternalCheckpoints | None = None,
        page: int = PAGE,
        clock: Clock | None = None,
        max_uncovered: timedelta | None = None,
    ) -> None:
        self._ledger = ledger
        self._clock = clock
        self._max_uncovered = max_uncovered
        self._check_signature = check_signature
        self._external = external_checkpoints
        self._page = page

    async def verify(self, from_seq: int = 1, collected: Sequence[CheckpointView] = ()) -> Report:
        """Verify from ``from_seq`` to the head as it is when verification starts (events
        appended meanwhile are left for the next run). ``collected``: checkpoints the
        caller holds (``broker.audit.collected``), checked like the file's: their
        signatures, their hashes against the events, the newest past the table's end."""
        if from_seq < 1:
            raise BadRequest("'from' must be a sequence number, 1 or more", code="invalid_field")
        # Checkpoints before the head: a checkpoint is only ever made of a committed head,
        # so read in this order none can be ahead of an untouched chain.
        checkpoints = list(await self._ledger.checkpoints())
        if self._external is not None:
            checkpoints += [cp for cp in await self._external() if cp.seq >= from_seq]
        checkpoints += [cp for cp in collected if cp.seq >= from_seq]
        head = await self._ledger.head()
        anchor = None
        if from_seq > 1:
            before = await self._ledger.event_hash(from_seq - 1)
            anchor = (from_seq - 1, before) if before is not None else None
        check = None
        if self._check_signature is not None:
            # Asked here (the signer may call out), answered to the pure verifier from memory.
            valid = {id(cp): await self._check_signature(cp) for cp in checkpoints}

            def check(cp: CheckpointView) -> bool | None:
                return valid[id(cp)]

        verifier = Verifier(
            from_seq=from_seq,
            anchor=anchor,
            checkpoints=checkpoints,
            check_signature=check,
            head=head,
            now=self._clock.now() if self._clock is not None else None,
            max_uncovered=self._max_uncovered,
        )
        after = from_seq - 1
        # Bounded: every page moves ``after`` forward, up to the head read above.
        for _ in range(head[0] // self._page + 2):
            page = await self._ledger.events_page(after=after, upto=head[0], limit=self._page)
            if not page:
                break
            verifier.feed(page)
            after = page[-1].seq
        return verifier.finish()
