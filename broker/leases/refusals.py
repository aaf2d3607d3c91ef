"""Refusals into the audit, bounded against floods.

A refused admin call (``admin.refused``) and a credential refused by a lock
(``credential.refused``) are audited, but a client can send thousands a second and each
event costs a transaction under the audit head's lock. So refusals are aggregated per
kind (actor, action, outcome, reason and their detail, which includes the client
address) and per window (a minute by default): the first of a kind in a window is written
at once with ``count: 1``, so a single refusal appears immediately; repeats in the same
window are only counted, and written as one event with ``count: N`` and the window's
bounds when the window closes (``flush``, called by a periodic tick, or the first
refusal after it).

A caller who is not authenticated (actor ``unknown``) chooses its token freely, so its
refusals are grouped by what it cannot vary for free (action, reason, method, route, scope,
source), never by the token: the ``token_fingerprint`` of the first is written with it, and
the repeats' event says how many distinct fingerprints the window saw
(``distinct_fingerprints``, counted up to ``MAX_FINGERPRINTS``). Kinds tracked per window are
capped, and separately for the authenticated (an operator, a workload: ``max_named_kinds``)
and the unauthenticated (``max_kinds``), so a flood of junk tokens never pushes out who made
a refused call. Beyond the cap, unauthenticated refusals are counted under one ``overflow``
kind; an authenticated caller's under an ``overflow`` kind that still names it, so memory
stays bounded too.

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
UNAUTHENTICATED = "unknown"
# Detail that an unauthenticated caller varies at will: not part of its refusal's kind.
_VARYING = "token_fingerprint"
MAX_FINGERPRINTS = 1000


class RefusalLedger(Protocol):
    async def record_audit(
        self, actor: str, action: str, *, outcome: str, reason: str | None, **detail: Any
    ) -> None: ...


@dataclass
class _Window:
    start: datetime
    repeats: dict[Kind, int] = field(default_factory=dict)
    fingerprints: dict[Kind, set[str]] = field(default_factory=dict)
    named: int = 0  # kinds of authenticated callers in ``repeats``

    def unnamed(self) -> int:
        return len(self.repeats) - self.named


class BoundedRefusals:
    def __init__(
        self,
        ledger: RefusalLedger,
        clock: Clock,
        *,
        window_s: float = 60.0,
        max_kinds: int = 1000,
        max_named_kinds: int = 10_000,
    ) -> None:
        self._ledger = ledger
        self._clock = clock
        self._window = timedelta(seconds=window_s)
        self._max_kinds = max_kinds
        self._max_named_kinds = max_named_kinds
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
        named = actor != UNAUTHENTICATED
        varying = None if named else detail.pop(_VARYING, None)
        kind: Kind = (actor, action, outcome, reason, tuple(sorted(detail.items())))
        now = self._clock.now()
        closed: _Window | None = None
        async with self._lock:
            window = self._current
            if window is None or now - window.start >= self._window:
                closed, window = window, _Window(start=now)
                self._current = window
            first = kind not in window.repeats
            if first and named and window.named >= self._max_named_kinds:
                kind = (actor, action, outcome, None, (("overflow", "true"),))
                first = kind not in window.repeats
            elif first and not named and window.unnamed() >= self._max_kinds:
                kind = (UNAUTHENTICATED, action, outcome, None, (("overflow", "true"),))
                first = kind not in window.repeats
            if first:
                window.repeats[kind] = 0
                window.named += named
            else:
                window.repeats[kind] += 1
            if varying is not None:
                seen = window.fingerprints.setdefault(kind, set())
                if len(seen) < MAX_FINGERPRINTS:
                    seen.add(varying)
        if closed is not None:
            await self._write_repeats(closed, closed.start + self._window)
        if first:
            await self._write(kind, count=1, **({_VARYING: varying} if varying else {}))

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
                seen = window.fingerprints.get(kind)
                distinct = {"distinct_fingerprints": len(seen)} if seen else {}
                await self._write(
                    kind, count=count, since=iso_z(window.start), until=iso_z(end), **distinct
                )
                written += 1
        return written

    async def _write(self, kind: Kind, *, count: int, **bounds: str | int) -> None:
        actor, action, outcome, reason, detail = kind
        try:
            await self._ledger.record_audit(
                actor, action, outcome=outcome, reason=reason, count=count, **dict(detail), **bounds
            )
        except BrokerError as exc:
            log.warning(
                "a refusal could not be audited", extra={"action": action, "code": exc.code}
            )
