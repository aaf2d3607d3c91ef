"""The reconciler's look for leases Vault forgot (restored from an older snapshot, storage
replaced, a mount re-enabled) before the broker revoked them.

Two places find them:

- the orphans step lists each of the broker's Vault paths; every recorded live lease under
  it, with no revocation of ours sent and not near its expiry, must be in that listing.
  The rows are compared page by page, resuming where the previous pass stopped
  (``MISSING_ROWS_PER_PASS`` per path and pass), so every row is compared over successive
  passes however many there are. One the listing lacks is looked up once; one Vault does
  not know is settled (``lost``, unless a direct check confirms it dead).
- the expiry step: a lease past its expiry that Vault does not know, with no revocation of
  ours sent, is ``expired`` unless a direct check finds its credential still valid: Vault
  never ended it, so it had forgotten the lease: ``lost``. A certificate (``pki``) needs
  no asking: it dies at its expiry by itself.

The decisions are pure functions; ``Amnesia`` does the I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from broker.clock import Clock
from broker.leases import LeaseState, LeaseView
from broker.leases.ending import (
    EXPIRY_MARGIN,
    MISSING_FROM_LISTING,
    UNKNOWN_BEFORE_REVOCATION,
    LeaseEnder,
)
from broker.revocation.bounded import Bounded
from broker.vault import VaultClient

# Recorded rows compared with one path's listing per pass at most; the next pass goes on
# from there.
MISSING_ROWS_PER_PASS = 20_000
# Why a lease past its expiry is lost, as the audit says it.
ALIVE_PAST_EXPIRY = "credential_alive_past_expiry"
# Engines whose credential dies at the lease's expiry without Vault (a certificate's
# notAfter is the lease's expiry): past it, a direct check has nothing to tell.
ENDS_BY_ITSELF = frozenset({"pki"})

Cursor = tuple[datetime, str]  # (created_at, lease_id) of the last row compared


# -- pure decisions ------------------------------------------------------------------


def unexpired_after(now: datetime, clock_skew_s: int) -> datetime:
    """Leases expiring after this cannot have expired in Vault yet: the broker records an
    expiry a little after Vault's (``EXPIRY_MARGIN``), and Vault's clock may be ahead of
    the broker's by ``clock_skew_s``."""
    return now + EXPIRY_MARGIN + timedelta(seconds=clock_skew_s)


def absent_from(rows: Sequence[LeaseView], listed: set[str]) -> list[LeaseView]:
    """The rows whose Vault lease the listing does not show."""
    return [r for r in rows if r.vault_lease_id not in listed]


def worth_asking(lease: LeaseView, engine: str | None) -> bool:
    """Whether a direct check can tell a lease past its expiry that Vault does not know
    from one Vault ended: no revocation of ours covers it, and its credential does not die
    at expiry by itself."""
    return lease.revoke_sent_at is None and engine not in ENDS_BY_ITSELF


# -- the I/O shell -------------------------------------------------------------------


@dataclass
class Found:
    """What settling leases Vault does not know recorded."""

    lost: list[str] = field(default_factory=list)  # lease ids
    expired: int = 0


class AmnesiaLedger(Protocol):
    async def unsent_live_under(
        self,
        path: str,
        *,
        expiring_after: datetime,
        after: Cursor | None = None,
        limit: int,
    ) -> tuple[list[LeaseView], Cursor | None]: ...


class Amnesia:
    def __init__(
        self,
        ledger: AmnesiaLedger,
        vault: VaultClient,
        clock: Clock,
        ender: LeaseEnder,
        bounded: Bounded,
        *,
        engine_of: Mapping[str, str],
        batch: int,
        clock_skew_s: int,
    ) -> None:
        self._ledger = ledger
        self._vault = vault
        self._clock = clock
        self._ender = ender
        self._bounded = bounded
        self._engine_of = engine_of
        self._batch = batch
        self._skew_s = clock_skew_s
        # Per path, where the next pass resumes comparing rows with the listing.
        self._cursors: dict[str, Cursor] = {}

    async def settle_unknown(self, leases: Sequence[LeaseView], why: str) -> Found:
        """Leases Vault said it does not know, settled as ``LeaseEnder`` decides."""
        found = Found()
        endings = await self._ender.settle_unknown(
            leases, actor="reconciler", found_by="reconciler", why=why
        )
        for lease_id, ending in endings.items():
            if ending.state is LeaseState.LOST:
                found.lost.append(lease_id)
            elif ending.state is LeaseState.EXPIRED:
                found.expired += 1
        return found

    async def missing(self, path: str, listed: set[str]) -> Found:
        """Recorded live leases under ``path``, no revocation of ours sent, not near their
        expiry, that Vault's listing (taken before they were read) does not show: each is
        looked up once, and one Vault does not know is settled. Up to
        ``MISSING_ROWS_PER_PASS`` rows, from where the previous pass stopped."""
        found = Found()
        after = self._cursors.get(path)
        compared = 0
        while compared < MISSING_ROWS_PER_PASS:
            rows, cursor = await self._ledger.unsent_live_under(
                path,
                expiring_after=unexpired_after(self._clock.now(), self._skew_s),
                after=after,
                limit=self._batch,
            )
            compared += self._batch
            absent = absent_from(rows, listed)
            if absent:
                ids = [str(r.vault_lease_id) for r in absent]
                known = await asyncio.gather(
                    *(self._bounded(self._vault.lease_exists, i) for i in ids)
                )
                forgotten = [r for r, exists in zip(absent, known, strict=True) if not exists]
                more = await self.settle_unknown(forgotten, MISSING_FROM_LISTING)
                found.lost.extend(more.lost)
                found.expired += more.expired
            if cursor is None:
                self._cursors.pop(path, None)  # every row compared: the next pass starts over
                return found
            after = cursor
            self._cursors[path] = cursor  # this page is done: a failure resumes after it
        return found

    async def past_expiry(self, leases: Sequence[LeaseView]) -> tuple[Found, list[str]]:
        """Leases past their expiry that Vault does not know. Those a revocation of ours
        covers are settled as ``LeaseEnder`` decides; of the others, one whose credential a
        direct check finds still valid is ``lost``. Returns what was recorded, and the
        lease ids left to record ``expired``."""
        ours = [lease for lease in leases if lease.revoke_sent_at is not None]
        found = await self.settle_unknown(ours, UNKNOWN_BEFORE_REVOCATION) if ours else Found()
        asked = [
            lease
            for lease in leases
            if lease.revoke_sent_at is None and worth_asking(lease, self._engine_of.get(lease.role))
        ]
        lost, alive = await self._ender.lost_past_expiry(
            asked, actor="reconciler", found_by="reconciler", why=ALIVE_PAST_EXPIRY
        )
        found.lost.extend(lost)
        settled = {lease.lease_id for lease in ours} | alive
        expired = [lease.lease_id for lease in leases if lease.lease_id not in settled]
        return found, expired
