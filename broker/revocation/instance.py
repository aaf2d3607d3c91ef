"""One pass of a revocation job over its instance: what the worker does to make Vault
forget it, and what the pass confirmed for the job's end to record.

For one instance, in this order (see DESIGN: revoking a token only *queues* its leases):
0. ask Vault about the recorded leases (one LIST of a path holding many of them, else a
   lookup each; a lease the LIST lacks is looked up; only lookups when Vault runs as an
   HA cluster, whose standbys may answer a LIST from a copy that lags): one no
   revocation of ours covered
   yet that Vault does not know is not taken for revoked (``broker.leases.ending``:
   expired, confirmed dead by a direct check, else ``lost``);
1. revoke explicitly, synchronously, 16 at a time, the recorded live leases not left to
   their token (below): each chunk gets ``revoke_sent_at`` (committed) right before its
   revocations are sent, so that a retry takes Vault's silence about them for our own
   revocation, never for a loss; a revocation that certainly did not take effect (Vault
   refused it, the connection was refused) takes its stamp back; Vault refusing one lease
   does not stop the others, Vault away ends the pass before the next chunk is stamped;
2. revoke every recorded instance token by accessor, the catch-all for a lease the broker
   never managed to record; right before each, the leases it covers that carry no stamp
   (those left to it, one whose own revocation was refused, the still issuing ones) are
   stamped, and unstamped when it certainly did not take effect; a token Vault no longer
   knows counts as revoked (retrying cannot change that) but covered nothing, and the
   leases left to it are revoked as in step 1. Left to the token: many leases under one
   path, issued under it, that step 0's LIST showed (Vault revokes them at half the CPU
   of a request each);
3. confirm with Vault that each lease is gone, as in step 0, polling while Vault works
   through what the token queued, and revoke explicitly what it still holds then; a lease
   whose synchronous revocation Vault answered is gone by that answer (Vault answers once
   it has removed the lease) and is not asked about again; a LIST's silence counts as
   gone only for a lease a LIST of this pass showed and a revocation of ours covers
   (stamped); a lease gone
   that no revocation of ours covers is settled as one Vault forgot (expired, confirmed
   dead, else ``lost``); only the others are marked ``revoked``;
4. a lease still ``issuing`` is waited for (its request is in flight) up to a bound, then
   marked ``abandoned``: its token is revoked, so Vault holds nothing usable for it;
5. leases that stand for STS sessions (``external_ref``), which no one can revoke, are
   denied in IAM once no request of the instance is in flight any more (so the deny's
   time comes after every session's issue time), abandoned ones included; each is
   marked ``revoked`` only once IAM shows the deny in place;
6. mark the job done and the instance terminated, with what the pass confirmed: one commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from broker.clock import Clock
from broker.errors import BrokerError, RevocationWaiting, UpstreamRejected, UpstreamUnavailable
from broker.leases import JobView, LeaseState, LeaseView, RevocationWork, TokenView
from broker.leases.ending import LeaseEnder, Stamp, sent_for_certain_not
from broker.revocation.bounded import VAULT_CONCURRENCY, Bounded
from broker.revocation.holds import Holdings, left_to_token
from broker.revocation.sessions import SessionRevoker, deny_sessions
from broker.revocation.settings import RevocationSettings
from broker.vault import VaultClient

log = logging.getLogger(__name__)


@dataclass
class Confirmed:
    """What a pass confirmed and has not recorded yet: the job's end records it in the
    same transaction; a pass that stops short records it on its own."""

    tokens: list[str] = field(default_factory=list)
    leases: list[str] = field(default_factory=list)
    # Leases a revocation of ours covers (their stamp in effect): stamped before the pass,
    # or by it and not taken back. Only such a lease may be recorded ``revoked``.
    covered: set[str] = field(default_factory=set)
    # Whether the pass is to end at its next safe point (before a stamp, before the wait
    # for Vault's queue): the broker is stopping, or another worker holds the job now.
    halt: Callable[[], bool] = lambda: False

    def check(self) -> None:
        if self.halt():
            raise RevocationWaiting("the pass stopped at a safe point; the job is taken up again")


class PassLedger(Protocol):
    """What a pass reads and writes of the lease ledgers (``RevocationJobRecords``)."""

    async def revocation_work(self, instance_id: str) -> RevocationWork: ...

    async def mark_leases_ended(
        self, lease_ids: Sequence[str], state: LeaseState, *, actor: str
    ) -> int: ...

    def exclusive(self, key: str, *, timeout_s: int = 30) -> AbstractAsyncContextManager[None]: ...


class InstancePass:
    """Runs a job's pass (``revoke_instance``); one per worker, shared by its jobs (the
    Vault calls of all of them bounded together)."""

    def __init__(
        self,
        settings: RevocationSettings,
        ledger: PassLedger,
        vault: VaultClient,
        clock: Clock,
        *,
        ender: LeaseEnder,
        bounded: Bounded,
        actor: str,
        cloud: SessionRevoker | None = None,
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._vault = vault
        self._clock = clock
        self._ender = ender
        self._bounded = bounded
        self._holdings = Holdings(vault, bounded)
        self._cloud = cloud
        self.actor = actor

    async def _stamp(self, lease_ids: Sequence[str], confirmed: Confirmed) -> Stamp:
        """Stamp, and count the leases as covered. A pass cancelled while the stamp is
        being written waits (shielded) for the write and takes it back: nothing was sent."""
        writing = asyncio.ensure_future(self._ender.stamp(lease_ids))
        try:
            stamp = await asyncio.shield(writing)
        except asyncio.CancelledError:

            async def take_back() -> None:
                await self._ender.unstamp(await writing)

            with contextlib.suppress(Exception):
                await asyncio.shield(take_back())
            raise
        confirmed.covered.update(stamp.lease_ids)
        return stamp

    async def _unstamp(
        self, stamp: Stamp, confirmed: Confirmed, lease_ids: Sequence[str] | None = None
    ) -> None:
        asked = set(stamp.lease_ids)
        taken = stamp.lease_ids if lease_ids is None else [i for i in lease_ids if i in asked]
        await self._ender.unstamp(stamp, taken)
        confirmed.covered.difference_update(taken)

    async def _revoke(self, lease: LeaseView, sent: set[str]) -> bool:
        sent.add(lease.lease_id)  # from here on Vault may have got it
        try:
            await self._vault.revoke_lease(str(lease.vault_lease_id))  # sync: done on return
        except BrokerError as exc:
            if sent_for_certain_not(exc):
                sent.discard(lease.lease_id)  # certainly not: as if never sent
            raise
        return True

    async def _revoke_leases(
        self, recorded: list[LeaseView], confirmed: Confirmed
    ) -> list[bool | BrokerError]:
        """Step 1, one bounded chunk at a time: the chunk's leases are stamped
        (``revoke_sent_at``) right before their revocations are sent, and a lease whose
        revocation certainly did not take effect (Vault refused it, or the connection was
        refused) has its stamp taken back. Vault away ends the pass after its chunk: the
        leases of later chunks were never stamped, so a retry still looks them up first.
        A pass cancelled (the broker stopping, the claim lost) takes back the stamps of
        the revocations it had not sent yet (they wait for the shared call limit)."""
        outcomes: list[bool | BrokerError] = []
        for start in range(0, len(recorded), VAULT_CONCURRENCY):
            confirmed.check()
            chunk = recorded[start : start + VAULT_CONCURRENCY]
            stamp = await self._stamp(
                [lease.lease_id for lease in chunk if lease.lease_id not in confirmed.covered],
                confirmed,
            )
            sent: set[str] = set()  # Vault may have acted on these (``_revoke``)
            try:
                answers = await asyncio.gather(
                    *(self._bounded(self._revoke, lease, sent) for lease in chunk),
                    return_exceptions=True,
                )
            finally:  # answered, or cancelled: the stamps of what was not sent go back
                unsent = [lease.lease_id for lease in chunk if lease.lease_id not in sent]
                await asyncio.shield(self._unstamp(stamp, confirmed, unsent))
            for answer in answers:
                if isinstance(answer, UpstreamUnavailable) or (
                    isinstance(answer, BaseException) and not isinstance(answer, BrokerError)
                ):
                    raise answer  # Vault away (or a crash): the pass ends after this chunk
                # Vault refusing one lease is that lease's outcome; the others go on.
                outcomes.append(answer if isinstance(answer, BrokerError) else True)
        return outcomes

    async def _revoke_tokens(
        self,
        tokens: Sequence[TokenView],
        uncovered: list[LeaseView],
        issuing: list[LeaseView],
        confirmed: Confirmed,
    ) -> set[str]:
        """Step 2: the instance's tokens by accessor; returns the accessors Vault no longer
        knew. Right before each token's revocation, the leases it covers that no stamp
        covers yet are stamped: ``uncovered`` ones issued under it (those left to it, one
        whose own revocation certainly failed), and, until one token's revocation took
        effect, those naming no token (still issuing: their request holds one of the
        instance's tokens). The stamp is taken back when that revocation did not take
        effect (Vault refused it, the connection was refused, or Vault no longer knew the
        token), so a stamp never stands for a revocation that was not sent; with several
        live tokens, the floating leases' stamp is taken back too when the pass ends before
        every token was revoked, or one turned out unknown to Vault (the one their request
        holds may be that one)."""
        live = [token for token in tokens if token.revoked_at is None]
        unknown: set[str] = set()
        floating = [
            lease.lease_id
            for lease in (*uncovered, *issuing)
            if lease.token_accessor is None and lease.lease_id not in confirmed.covered
        ]
        floated: Stamp | None = None  # the stamp the floating leases carry
        floaters: list[str] = []
        try:
            for token in live:
                confirmed.check()
                mine = [
                    lease.lease_id
                    for lease in uncovered
                    if lease.token_accessor == token.accessor
                    and lease.lease_id not in confirmed.covered
                ]
                stamp = await self._stamp([*mine, *floating], confirmed)
                if floating:  # theirs until this revocation proves not to take effect
                    floated, floaters = stamp, floating
                try:
                    known = await self._vault.revoke_accessor(token.accessor)
                except BrokerError as exc:
                    if sent_for_certain_not(exc):
                        await self._unstamp(stamp, confirmed)
                        if floated is stamp:
                            floated = None
                    raise
                if known:
                    floating = []
                else:
                    if floated is stamp:
                        floated = None  # taken back below with the rest of this stamp
                    # Vault no longer knows the token: nothing it held is revoked by this
                    # call, and retrying cannot change that; its leases are looked at alone.
                    log.warning(
                        "Vault no longer knew an instance token; its leases are checked "
                        "one by one",
                        extra={"token_accessor": token.accessor},
                    )
                    await self._unstamp(stamp, confirmed)
                    unknown.add(token.accessor)
                confirmed.tokens.append(token.accessor)
        except BaseException:
            # With one live token their request holds that one, and its stamp stands as
            # for its own leases; with several, the one it holds may not be revoked yet.
            if floated is not None and len(live) > 1 and len(confirmed.tokens) < len(live):
                await asyncio.shield(self._unstamp(floated, confirmed, floaters))
            raise
        if floated is not None and unknown:
            # A token Vault no longer knew may be the one their request holds.
            await self._unstamp(floated, confirmed, floaters)
        return unknown

    async def revoke_instance(self, job: JobView, confirmed: Confirmed) -> None:
        work = await self._ledger.revocation_work(job.instance_id)
        recorded = [lease for lease in work.leases if lease.vault_lease_id]
        issuing = [lease for lease in work.leases if lease.state == LeaseState.ISSUING]
        # Live STS sessions with no Vault lease: only a deny at AWS ends them.
        sessions = [
            lease
            for lease in work.leases
            if not lease.vault_lease_id and lease.state != LeaseState.ISSUING
        ]

        # Every revocation this worker sends is preceded by its stamp (a token's included:
        # it stamps the leases it covers), and migration 0006 stamped what older code had
        # sent: a lease without a stamp was covered by no revocation of ours. (A token
        # recorded revoked is no proof: Vault may not have known it any more.)
        recorded, listed = await self._settle_forgotten(recorded)
        alone, by_token = left_to_token(recorded, work.tokens, listed)
        outcomes: dict[str, bool | BrokerError] = {}
        confirmed.covered.update(lease.lease_id for lease in work.leases if lease.revoke_sent_at)
        first = await self._revoke_leases(alone, confirmed)
        outcomes.update((lease.lease_id, o) for lease, o in zip(alone, first, strict=True))
        refused = [
            lease
            for lease, outcome in zip(alone, first, strict=True)
            if lease.lease_id not in confirmed.covered and isinstance(outcome, BrokerError)
        ]
        unknown = await self._revoke_tokens(work.tokens, [*by_token, *refused], issuing, confirmed)
        # A token Vault no longer knew revoked nothing: the leases left to it are revoked
        # one by one (their stamp was taken back), as if never left to it.
        untaken = [lease for lease in by_token if lease.token_accessor in unknown]
        if untaken:
            late = await self._revoke_leases(untaken, confirmed)
            outcomes.update((lease.lease_id, o) for lease, o in zip(untaken, late, strict=True))
            by_token = [lease for lease in by_token if lease.token_accessor not in unknown]
        # Then Vault's word on each: a lease it no longer holds is gone (the token's
        # revocation may also have taken one whose own revocation was refused). The leases
        # left to the token are waited for while Vault works through them; what it still
        # holds after that is revoked explicitly, for Vault's own answer.
        # A LIST's silence about a lease is taken for gone only for one a LIST of this pass
        # showed and our revocation covers; any other is looked up. A lease whose
        # synchronous revocation Vault answered is not asked about again: Vault answers
        # only once the lease is removed (or if it had none, which no later question
        # could tell apart either).
        ids = [str(lease.vault_lease_id) for lease in recorded]
        trusted = {
            str(lease.vault_lease_id)
            for lease in recorded
            if lease.vault_lease_id in listed and lease.lease_id in confirmed.covered
        }

        def unanswered() -> list[str]:
            done = {
                str(lease.vault_lease_id)
                for lease in recorded
                if outcomes.get(lease.lease_id) is True
            }
            return [i for i in ids if i not in done]

        held = await self._holdings.held(unanswered(), trusted=trusted)
        if by_token and held:
            held = await self._holdings.wait_for_queue(
                [i for i in ids if i in held], trusted=trusted, stopping=confirmed.halt
            )
            stragglers = [lease for lease in by_token if lease.vault_lease_id in held]
            if stragglers:
                late = await self._revoke_leases(stragglers, confirmed)
                outcomes.update(
                    (lease.lease_id, o) for lease, o in zip(stragglers, late, strict=True)
                )
                held = await self._holdings.held(unanswered(), trusted=trusted)
        gone = [lease for lease in recorded if lease.vault_lease_id not in held]
        # Gone without a revocation of ours in effect for it (its own refused and taken
        # back, no token of ours left to cover it): not ours to call revoked; settled as
        # one Vault forgot (expired, confirmed dead, else lost).
        unowned = [
            lease
            for lease in gone
            if lease.lease_id not in confirmed.covered and lease.external_ref is None
        ]
        if unowned:
            await self._ender.settle_unknown(unowned, actor=self.actor, found_by="revocation")
        # A lease that is also an STS session (Vault's revoke of it is a no-op at AWS) waits
        # for its deny before it counts as revoked.
        confirmed.leases.extend(
            lease.lease_id
            for lease in gone
            if lease.external_ref is None and lease.lease_id in confirmed.covered
        )
        if len(gone) != len(recorded):
            # Why, when Vault said: its refusal of a lease still live.
            for lease in recorded:
                outcome = outcomes.get(lease.lease_id)
                if lease.vault_lease_id in held and isinstance(outcome, BrokerError):
                    raise outcome
            raise UpstreamRejected(
                f"{len(recorded) - len(gone)} lease(s) still exist in Vault after revocation",
                code="revocation_unconfirmed",
            )

        if issuing:
            self._wait_for_issuing(issuing)
        external = [lease for lease in (*gone, *sessions, *issuing) if lease.external_ref]
        if external:
            await deny_sessions(
                external,
                cloud=self._cloud,
                ledger=self._ledger,
                now=self._clock.now(),
                actor=self.actor,
            )
        if issuing:
            await self._settle_issuing(issuing)

    async def _settle_forgotten(
        self, recorded: list[LeaseView]
    ) -> tuple[list[LeaseView], frozenset[str]]:
        """Step 0: the recorded leases Vault still knows, or that a revocation of ours
        already covers (stamped); those no revocation covered and Vault does not know are
        settled (expired, confirmed dead, else lost) and left out. An STS session's lease
        is left to its deny in IAM, whatever Vault knows. Also returns the Vault lease ids
        a LIST showed present (``Survey.listed``)."""
        asked = [lease for lease in recorded if lease.external_ref is None]
        if not asked:
            return recorded, frozenset()
        survey = await self._holdings.survey(
            [str(lease.vault_lease_id) for lease in asked]
        )
        forgotten = [
            lease
            for lease in asked
            if lease.revoke_sent_at is None and lease.vault_lease_id not in survey.held
        ]
        if not forgotten:
            return recorded, survey.listed
        await self._ender.settle_unknown(forgotten, actor=self.actor, found_by="revocation")
        settled = {lease.lease_id for lease in forgotten}
        return [lease for lease in recorded if lease.lease_id not in settled], survey.listed

    def _wait_for_issuing(self, issuing: list[LeaseView]) -> None:
        bound = timedelta(seconds=self._settings.issuing_timeout_s)
        now = self._clock.now()
        young = [lease for lease in issuing if now - lease.created_at < bound]
        if young:
            # A request is between writing its row and recording Vault's answer; once it
            # records, the lease is revoked on the next pass.
            raise RevocationWaiting(f"{len(young)} lease(s) still being issued")

    async def _settle_issuing(self, issuing: list[LeaseView]) -> None:
        self._wait_for_issuing(issuing)
        moved = await self._ledger.mark_leases_ended(
            [lease.lease_id for lease in issuing], LeaseState.ABANDONED, actor=self.actor
        )
        if moved != len(issuing):
            # Some completed meanwhile and are active now: revoke them on the next pass.
            raise RevocationWaiting(
                f"{len(issuing) - moved} lease(s) completed while being settled"
            )
