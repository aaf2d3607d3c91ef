"""Refusals into the audit, bounded against floods.

A refused admin call (``admin.refused``) and a credential refused by a lock
(``credential.refused``) are audited, but a client can send thousands a second and each
event costs a transaction under the audit head's lock. So refusals are aggregated per
kind (actor, action, outcome, reason and their detail, which includes the client
address) and per window (a minute by default): the first of a kind in a window is written
at once with ``count: 1``, so a single refusal appears immediately; repeats in the same
window are only counted, and written as one event with ``count: N`` and the window's
bounds when the window closes (``flush``, called by a periodic tick, or the first
refusal after it). Kinds tracked per window are capped (``max_kinds``): beyond it, refusals
are counted under one ``overflow`` kind, so memory stays bounded too.

An audit write that fails is logged and dropped: the caller is refused all the same.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from broker.clock import Clock, iso_z
from broker.errors import BrokerError

log = logging.getLogger(__name__)
Kind = tuple[str, str, str, str | None, tuple[tuple[str, str], ...]]


class RefusalLedger(Protocol):
    async def record_audit(
        self, actor: str, action: str, *, outcome: str, reason: str | None, **detail: Any
    ) -> None: ...


@dataclass
class _Window:
    start: datetime
    repeats: dict[Kind, int] = field(default_factory=dict)


class BoundedRefusals:
    def __init__(
        self,
        ledger: RefusalLedger,
        clock: Clock,
        *,
        window_s: float = 60.0,
        max_kinds: int = 1000,
    ) -> None:
        self._ledger = ledger
        self._clock = clock
        self._window = timedelta(seconds=window_s)
        self._max_kinds = max_kinds
        self._current: _Window | None = None
        self._lock = asyncio.Lock()

    async def refused(
        self,
        actor: str,
        action: str,
        *,
        outcome: str = "refused",
        reason: str | None = None,
        **detail: str,
    ) -> None:
        """Count one refusal; write it now if it is the first of its kind in this window."""
        kind: Kind = (actor, action, outcome, reason, tuple(sorted(detail.items())))
        now = self._clock.now()
        closed: _Window | None = None
        async with self._lock:
            window = self._current
            if window is None or now - window.start >= self._window:
                closed, window = window, _Window(start=now)
                self._current = window
            first = kind not in window.repeats
            if first and len(window.repeats) >= self._max_kinds:
                kind = ("unknown", action, outcome, None, (("overflow", "true"),))
                first = kind not in window.repeats
            if first:
                window.repeats[kind] = 0
            else:
                window.repeats[kind] += 1
        if closed is not None:
            await self._write_repeats(closed, closed.start + self._window)
        if first:
            await self._write(kind, count=1)

    async def flush(self) -> int:
        """Write the repeats of a window that has closed; returns how many events."""
        async with self._lock:
            window = self._current
            if window is None or self._clock.now() - window.start < self._window:
                return 0
            self._current = None
        return await self._write_repeats(window, window.start + self._window)

    async def flush_all(self) -> int:
        """Write every counted repeat now (at shutdown)."""
        async with self._lock:
            window, self._current = self._current, None
        return 0 if window is None else await self._write_repeats(window, self._clock.now())

    async def _write_repeats(self, window: _Window, end: datetime) -> int:
        written = 0
        for kind, count in window.repeats.items():
            if count:
                await self._write(kind, count=count, since=iso_z(window.start), until=iso_z(end))
                written += 1
        return written

    async def _write(self, kind: Kind, *, count: int, **bounds: str) -> None:
        actor, action, outcome, reason, detail = kind
        try:
            await self._ledger.record_audit(
                actor, action, outcome=outcome, reason=reason, count=count, **dict(detail), **bounds
            )
        except BrokerError as exc:
            log.warning(
                "a refusal could not be audited", extra={"action": action, "code": exc.code}
            )
