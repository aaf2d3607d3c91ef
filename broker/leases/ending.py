"""How a lease ends when Vault says it does not know it: revoked by the broker, expired,
or ``lost`` (Vault forgot it: restored from an older snapshot, storage replaced, a mount
re-enabled). "Vault does not know it" is never taken as proof of revocation by itself.

The decision (``decide``) is pure; ``LeaseEnder`` is the I/O shell every path that ends a
lease shares (the revocation worker, a workload's release, the lease-limit replacement and
its sweep, renewal, the reconciler): it looks a lease up before revoking it, records
``revoke_sent_at`` before the first revocation that covers it, asks a direct check
(``CredentialCheck``) when one can tell, and records the outcome with its audit event.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from broker.clock import Clock
from broker.errors import BrokerError
from broker.leases.states import LeaseState
from broker.leases.views import LeaseView

log = logging.getLogger(__name__)

# The broker records a lease's expiry a little after Vault's (it stamps ``issued_at`` once
# Vault answered): a lease Vault forgot this close to the recorded expiry expired.
EXPIRY_MARGIN = timedelta(seconds=5)

# Why a lease is lost, as the audit says it.
UNKNOWN_BEFORE_REVOCATION = "vault_unknown_before_revocation"
MISSING_FROM_LISTING = "missing_from_vault_listing"
UNKNOWN_AT_RENEWAL = "vault_unknown_at_renewal"

# The error line a loss writes, by how it was found: Vault did not know a lease the broker
# had not revoked (before its expiry), or a direct check found a credential still valid
# past its expiry.
LOST_UNKNOWN_LOG = (
    "a lease was lost: Vault no longer knew it before the broker revoked it; "
    "the credential may still work until it is ended by hand"
)
LOST_ALIVE_LOG = (
    "a lease was lost: Vault no longer knew it although its credential still "
    "works past its expiry; it works until it is ended by hand"
)


class CheckAnswer(Protocol):
    """A direct check's answer for one lease, with the name of the check that gave it."""

    @property
    def gone(self) -> bool | None:
        """True: the credential is confirmed dead; False: confirmed still valid; None:
        no check could tell for this lease."""
        ...

    @property
    def by(self) -> str:
        """The check that answered ("crl", "database"): the audit's ``confirmed_by``."""
        ...


class CredentialCheck(Protocol):
    """A direct look at the credential, without Vault and without holding a secret (a
    certificate serial against its CRL, a database username against the database)."""

    async def gone(self, lease: LeaseView) -> CheckAnswer: ...


@dataclass(frozen=True)
class Ending:
    """What became of a lease Vault does not know."""

    state: LeaseState  # the state to record: ours (revoked, released), expired or lost
    confirmed_by: str | None = None  # the direct check that confirmed it dead


def past_expiry(lease: LeaseView, now: datetime) -> bool:
    return lease.expires_at is not None and now >= lease.expires_at - EXPIRY_MARGIN


def worth_checking(lease: LeaseView, now: datetime) -> bool:
    """Whether only a direct check can tell revoked from lost: no revocation of ours was
    sent and the lease was not past its expiry."""
    return lease.revoke_sent_at is None and not past_expiry(lease, now)


def decide(
    lease: LeaseView,
    now: datetime,
    *,
    confirmed: bool | None = None,
    by: str | None = None,
    ours: LeaseState = LeaseState.REVOKED,
) -> Ending:
    """A lease Vault says it does not know. ``ours``: the state the path records for a
    lease it ended itself (``revoked``; ``released`` for a workload's release);
    ``confirmed``/``by``: a direct check's answer and its name."""
    if lease.revoke_sent_at is not None:
        return Ending(ours)  # we revoked it: Vault not knowing it is our doing
    if past_expiry(lease, now):
        return Ending(LeaseState.EXPIRED)
    if confirmed is True:
        return Ending(ours, confirmed_by=by)
    return Ending(LeaseState.LOST)


class VaultLeases(Protocol):
    """What the shell asks Vault (``broker.vault.VaultClient``)."""

    async def lease_exists(self, lease_id: str) -> bool: ...

    async def revoke_lease(self, lease_id: str) -> None: ...


class EndingLedger(Protocol):
    """What the shell records (``broker.leases.ending_records.EndingRecords``)."""

    async def mark_revoke_sent(self, lease_ids: Sequence[str], at: datetime) -> int: ...

    async def clear_revoke_sent(self, lease_ids: Sequence[str], at: datetime) -> int: ...

    async def end_decided(
        self,
        lease: LeaseView,
        ending: Ending,
        *,
        actor: str,
        engine: str | None,
        found_by: str,
        why: str,
    ) -> bool: ...


class LostLeases:
    """Leases found lost by this replica since start, by (role, found_by), for the metric
    ``broker_leases_lost_total``."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()

    def record(self, role: str, found_by: str) -> None:
        self._counts[(role, found_by)] += 1

    def counts(self) -> dict[tuple[str, str], int]:
        return dict(self._counts)


@dataclass(frozen=True)
class Revoked:
    """A lease a path ended in Vault itself: the caller records it as its own."""


@dataclass(frozen=True)
class Stamp:
    """``revoke_sent_at`` written by one path just before it sends a revocation: the time
    it wrote (None when there was nothing to stamp) and the leases it asked for. Only a
    stamp of this very time is cleared again (``LeaseEnder.unstamp``), never another
    path's."""

    at: datetime | None
    lease_ids: tuple[str, ...] = ()


def sent_for_certain_not(exc: object) -> bool:
    """Whether a failed revocation certainly did not take effect: Vault answered and
    refused, or the connection was refused (nothing was sent). A timeout, a dropped
    connection or a proxy's 502/504 may have reached Vault: the stamp stays."""
    return isinstance(exc, BrokerError) and not exc.outcome_unknown


class LeaseEnder:
    """The I/O shell around ``decide``, shared by every path that ends a lease."""

    def __init__(
        self,
        vault: VaultLeases,
        ledger: EndingLedger,
        clock: Clock,
        *,
        engine_of: Mapping[str, str] | None = None,
        checks: CredentialCheck | None = None,
        lost: LostLeases | None = None,
    ) -> None:
        self._vault = vault
        self._ledger = ledger
        self._clock = clock
        self._engine_of = dict(engine_of or {})
        self._checks = checks
        self.lost = lost or LostLeases()

    async def settle_unknown(
        self,
        leases: Sequence[LeaseView],
        *,
        actor: str,
        found_by: str,
        why: str = UNKNOWN_BEFORE_REVOCATION,
        ours: LeaseState = LeaseState.REVOKED,
    ) -> dict[str, Ending]:
        """Record what became of leases Vault said it does not know; by lease id, the
        ending recorded for each. One that another path ended meanwhile (or sent a
        revocation for, before ``lost`` was recorded) stays as it was and is left out:
        only endings actually recorded are reported."""
        out: dict[str, Ending] = {}
        for lease in leases:
            ending = await self._decide(lease, ours)
            if await self._record(
                lease, ending, actor=actor, found_by=found_by, why=why, lost_log=LOST_UNKNOWN_LOG
            ):
                out[lease.lease_id] = ending
        return out

    async def stamp(self, lease_ids: Sequence[str]) -> Stamp:
        """``revoke_sent_at``, committed right before a revocation that covers these leases
        is sent (a lease stamped already keeps its first stamp)."""
        ids = tuple(lease_ids)
        if not ids:
            return Stamp(None)
        at = self._clock.now()
        await self._ledger.mark_revoke_sent(ids, at)
        return Stamp(at, ids)

    async def unstamp(self, stamp: Stamp, lease_ids: Sequence[str] | None = None) -> int:
        """Take back ``stamp`` (on ``lease_ids`` of it, default all) when the revocation it
        announced certainly did not take effect (``sent_for_certain_not``) and no other
        revocation of ours covered these leases: Vault not knowing them later is then not
        our doing. Raises ``BrokerError`` when the store cannot be written."""
        ids = stamp.lease_ids
        if lease_ids is not None:  # only leases this stamp was asked to stamp
            asked = set(stamp.lease_ids)
            ids = tuple(lid for lid in lease_ids if lid in asked)
        if stamp.at is None or not ids:
            return 0
        return await self._ledger.clear_revoke_sent(ids, stamp.at)

    async def _unstamp_quietly(self, stamp: Stamp) -> None:
        try:
            await self.unstamp(stamp)
        except BrokerError:
            log.warning(
                "could not clear revoke_sent_at after a revocation Vault refused",
                extra={"lease_ids": list(stamp.lease_ids)},
            )

    async def _decide(self, lease: LeaseView, ours: LeaseState) -> Ending:
        now = self._clock.now()
        if self._checks is None or not worth_checking(lease, now):
            return decide(lease, now, ours=ours)
        try:
            answer = await self._checks.gone(lease)
        except Exception:  # noqa: BLE001 — a check that fails cannot tell
            log.warning(
                "a direct credential check failed", extra={"lease_id": lease.lease_id}
            )
            return decide(lease, now, ours=ours)
        return decide(lease, now, confirmed=answer.gone, by=answer.by, ours=ours)

    async def end_one(
        self, lease: LeaseView, *, actor: str, found_by: str, ours: LeaseState
    ) -> Ending | Revoked | None:
        """Revoke one recorded lease, looking it up first. An ``Ending``: Vault did not know
        it, and the decision is recorded; ``Revoked``: revoked and confirmed gone, for the
        caller to record as its own; None: not ended by this call (Vault still holds it
        after revoking, or another path ended it meanwhile): look again. Raises
        ``BrokerError`` when Vault fails; a revocation that certainly did not take effect
        takes its ``revoke_sent_at`` back first."""
        vault_lease_id = lease.vault_lease_id
        assert vault_lease_id is not None
        stamp = Stamp(None)
        if lease.revoke_sent_at is None:
            if not await self._vault.lease_exists(vault_lease_id):
                decided = await self.settle_unknown(
                    [lease], actor=actor, found_by=found_by, ours=ours
                )
                return decided.get(lease.lease_id)
            stamp = await self.stamp([lease.lease_id])
        try:
            await self._vault.revoke_lease(vault_lease_id)
        except BrokerError as exc:
            if sent_for_certain_not(exc):
                await self._unstamp_quietly(stamp)
            raise
        if await self._vault.lease_exists(vault_lease_id):
            return None
        return Revoked()

    async def lost_past_expiry(
        self, leases: Sequence[LeaseView], *, actor: str, found_by: str, why: str
    ) -> tuple[list[str], set[str]]:
        """Leases past their expiry that Vault does not know and no revocation of ours
        covers: each one whose credential a direct check finds still valid (False) was
        never ended by Vault, which forgot it: it is recorded ``lost``. Returns the lease
        ids recorded lost, and those found still valid (recorded or, ended meanwhile, not);
        the others are the caller's to record ``expired``."""
        lost: list[str] = []
        alive: set[str] = set()
        if self._checks is None:
            return lost, alive
        for lease in leases:
            try:
                answer = await self._checks.gone(lease)
            except Exception:  # noqa: BLE001 — a check that fails cannot tell
                log.warning("a direct credential check failed", extra={"lease_id": lease.lease_id})
                answer = None
            if answer is None or answer.gone is not False:
                continue
            alive.add(lease.lease_id)
            if await self._record(
                lease,
                Ending(LeaseState.LOST),
                actor=actor,
                found_by=found_by,
                why=why,
                lost_log=LOST_ALIVE_LOG,
            ):
                lost.append(lease.lease_id)
        return lost, alive

    async def _record(
        self,
        lease: LeaseView,
        ending: Ending,
        *,
        actor: str,
        found_by: str,
        why: str,
        lost_log: str,
    ) -> bool:
        """Record ``ending`` with its audit event; False when another path ended the lease
        (or sent its revocation) meanwhile and nothing was recorded. The one way a loss is
        recorded: a ``lost`` ending is counted for ``broker_leases_lost_total`` and logged
        as an error (``lost_log``, saying how it was found) with what an operator needs to
        end the credential by hand."""
        moved = await self._ledger.end_decided(
            lease,
            ending,
            actor=actor,
            engine=self._engine_of.get(lease.role),
            found_by=found_by,
            why=why,
        )
        if moved and ending.state is LeaseState.LOST:
            self.lost.record(lease.role, found_by)
            log.error(
                lost_log,
                extra={
                    "lease_id": lease.lease_id,
                    "instance_id": lease.instance_id,
                    "role": lease.role,
                    "vault_path": lease.vault_path,
                    "found_by": found_by,
                },
            )
        return moved
