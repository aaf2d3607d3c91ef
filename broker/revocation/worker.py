"""The revocation worker: claims jobs from its ledger and makes Vault forget an instance.

For one instance, in this order (see DESIGN: revoking a token only *queues* its leases):
0. ask Vault about the recorded leases (one LIST of a path holding many of them, else a
   lookup each; a lease the LIST lacks is looked up): one no revocation of ours covered
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
   through what the token queued, and revoke explicitly what it still holds then; a LIST's
   silence counts as gone only for a lease a LIST of this pass showed, or whose
   synchronous revocation Vault answered; only a lease Vault no longer holds is ``revoked``;
4. a lease still ``issuing`` is waited for (its request is in flight) up to a bound, then
   marked ``abandoned``: its token is revoked, so Vault holds nothing usable for it;
5. leases that stand for STS sessions (``external_ref``), which no one can revoke, are
   denied in IAM once no request of the instance is in flight any more (so the deny's
   time comes after every session's issue time), abandoned ones included; each is
   marked ``revoked`` only once IAM shows the deny in place;
6. mark the job done and the instance terminated, with what the pass confirmed: one commit.

Jobs run ``batch`` at a time; a slot a finished job frees is claimed again at once
(``drain``, which stops claiming when the broker stops). Every step is idempotent, so a
worker that dies anywhere leaves a job that the next claim (after ``claim_timeout_s``)
finishes. Failures retry with exponential backoff and jitter; after ``max_attempts`` the
job is ``failed``: visible, counted, retried when asked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from broker.backoff import retry_delay
from broker.clock import Clock
from broker.errors import BrokerError, RevocationWaiting, UpstreamRejected, UpstreamUnavailable
from broker.leases import JobView, LeaseState, LeaseView, RevocationWork, TokenView
from broker.leases.ending import LeaseEnder, Revoked, sent_for_certain_not
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


class RevocationJobs(Protocol):
    """What the worker reads and writes of the lease ledgers (``RevocationJobRecords``)."""

    async def claim_jobs(
        self, *, worker: str, limit: int, claim_for: timedelta
    ) -> list[JobView]: ...

    async def extend_claim(self, job: JobView, *, worker: str, claim_for: timedelta) -> bool: ...

    async def finish_job(
        self,
        job: JobView,
        *,
        worker: str,
        tokens: Sequence[str] = (),
        revoked: Sequence[str] = (),
        actor: str | None = None,
    ) -> bool: ...

    async def record_confirmed(
        self, instance_id: str, *, tokens: Sequence[str], revoked: Sequence[str], actor: str
    ) -> None: ...

    async def reschedule_job(
        self,
        job: JobView,
        *,
        worker: str,
        error: str,
        next_attempt_at: datetime,
        give_up: bool,
        count_attempt: bool = True,
    ) -> None: ...

    async def revocation_work(self, instance_id: str) -> RevocationWork: ...

    async def mark_leases_ended(
        self, lease_ids: Sequence[str], state: LeaseState, *, actor: str
    ) -> int: ...

    async def superseded_leases(
        self, *, older_than: timedelta, limit: int = 200
    ) -> list[LeaseView]: ...

    def exclusive(self, key: str, *, timeout_s: int = 30) -> AbstractAsyncContextManager[None]: ...


class RevocationWorker:
    def __init__(
        self,
        settings: RevocationSettings,
        ledger: RevocationJobs,
        vault: VaultClient,
        clock: Clock,
        *,
        on_terminated: Callable[[str], None] | None = None,
        worker_id: str | None = None,
        jitter: Callable[[], float] = random.random,
        cloud: SessionRevoker | None = None,
        ender: LeaseEnder,
    ) -> None:
        self._settings = settings
        self._ender = ender
        self._ledger = ledger
        self._vault = vault
        self._clock = clock
        self._cloud = cloud
        self._on_terminated = on_terminated
        self._jitter = jitter
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        # How the audit names what this worker does: ``revocation`` first, so an operator
        # finds every revocation with ``audit list --actor revocation``.
        self.actor = f"revocation:{self.worker_id}"
        self._bounded = Bounded()
        self._holdings = Holdings(vault, self._bounded)
        self._stopping = False
        self._completed = 0
        self._retried = 0
        self._failed = 0

    def counts(self) -> dict[str, int]:
        """Job passes of this worker since start, by outcome, for the metrics."""
        return {"completed": self._completed, "retried": self._retried, "failed": self._failed}

    def stop_claiming(self) -> None:
        """Shutting down: ``drain`` claims no more jobs and returns once the jobs it runs
        have ended, so that none is left claimed (and waiting ``claim_timeout_s`` for
        another replica) because the process stopped in the middle of it."""
        self._stopping = True

    async def drain(self) -> int:
        """Process due jobs until none is due, up to ``batch`` at once; a slot a finished
        job frees is filled by a new claim at once, so that one slow instance (many leases,
        a slow engine) does not hold back the jobs behind it as a batch would, and a job
        requested meanwhile is claimed without waiting for the next tick. Returns how many
        jobs were claimed. One job failing in an unexpected way is logged and does not
        touch the others."""
        running: dict[asyncio.Task[None], str] = {}
        claimed = 0
        try:
            while True:
                free = self._settings.batch - len(running)
                # A claim per freed slot would cost a transaction per job: claim once a
                # quarter of the slots are free (at once when none is running).
                wanted = free >= max(1, self._settings.batch // 4) or not running
                if wanted and not self._stopping:
                    jobs = await self._ledger.claim_jobs(
                        worker=self.worker_id,
                        limit=free,
                        claim_for=timedelta(seconds=self._settings.claim_timeout_s),
                    )
                    claimed += len(jobs)
                    mine = set(running.values())
                    for job in jobs:
                        # Our own claim lapsed (the store was away) and we claimed the job
                        # again: the task already on it goes on under the renewed claim
                        # (the same worker id); a second task would run the job twice.
                        if job.job_id not in mine:
                            running[asyncio.create_task(self._process(job))] = job.job_id
                if not running:
                    return claimed
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    job_id = running.pop(task)
                    if not task.cancelled() and (exc := task.exception()) is not None:
                        log.error(
                            "a revocation job's task failed",
                            exc_info=exc,
                            extra={"job_id": job_id},
                        )
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _process(self, job: JobView) -> None:
        holding = asyncio.create_task(self._hold_claim(job))
        try:
            await self._process_claimed(job)
        finally:
            holding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holding

    async def _hold_claim(self, job: JobView) -> None:
        """Extend the claim while the job runs (Vault may be slow or away for longer than
        ``claim_timeout_s``), so no other replica takes over a job whose worker is alive.
        A worker that dies stops extending, and its claim lapses as before."""
        claim_for = timedelta(seconds=self._settings.claim_timeout_s)
        while True:
            await asyncio.sleep(self._settings.claim_timeout_s / 3)
            try:
                if not await self._ledger.extend_claim(
                    job, worker=self.worker_id, claim_for=claim_for
                ):
                    log.warning("lost the claim on a revocation job", extra={"job_id": job.job_id})
                    return
            except BrokerError:
                continue  # the store is away: the claim may lapse; the guards still hold

    async def _process_claimed(self, job: JobView) -> None:
        confirmed = Confirmed()
        try:
            await self._revoke_instance(job, confirmed)
        except BrokerError as exc:
            await self._record_confirmed(job, confirmed)
            await self._retry(job, exc)
            return
        except Exception as exc:  # noqa: BLE001 — a job never dies silently
            log.exception("revocation job crashed", extra={"job_id": job.job_id})
            await self._record_confirmed(job, confirmed)
            await self._retry(job, exc)
            return
        try:
            finished = await self._ledger.finish_job(
                job,
                worker=self.worker_id,
                tokens=confirmed.tokens,
                revoked=confirmed.leases,
                actor=self.actor,
            )
        except BrokerError as exc:
            await self._retry(job, exc)
            return
        if not finished:
            log.warning(
                "a revocation job was taken over before this worker finished it",
                extra={"job_id": job.job_id, "instance_id": job.instance_id},
            )
            return
        self._completed += 1
        if self._on_terminated is not None:
            self._on_terminated(job.instance_id)
        log.info(
            "instance terminated",
            extra={
                "instance_id": job.instance_id,
                "job_id": job.job_id,
                "attempts": job.attempts,
            },
        )

    async def _record_confirmed(self, job: JobView, confirmed: Confirmed) -> None:
        """What a pass that stops short confirmed, recorded so that the next pass does not
        do it again. The store away: the next pass finds the same in Vault (its tokens
        unknown, its leases gone after our stamp) and records it then."""
        try:
            await self._ledger.record_confirmed(
                job.instance_id,
                tokens=confirmed.tokens,
                revoked=confirmed.leases,
                actor=self.actor,
            )
        except BrokerError:
            log.warning(
                "could not record what a revocation pass confirmed",
                extra={"job_id": job.job_id},
            )

    async def _retry(self, job: JobView, exc: Exception) -> None:
        code = exc.code if isinstance(exc, BrokerError) else type(exc).__name__
        waiting = isinstance(exc, RevocationWaiting)
        give_up = not waiting and job.attempts >= self._settings.max_attempts
        if waiting:
            delay = min(self._settings.tick_s * 2, 5.0)
        else:
            delay = retry_delay(
                job.attempts,
                base=self._settings.backoff_base_s,
                cap=self._settings.backoff_max_s,
                jitter=self._jitter(),
            )
        next_at = self._clock.now() + timedelta(seconds=delay)
        try:
            await self._ledger.reschedule_job(
                job,
                worker=self.worker_id,
                error=code,
                next_attempt_at=next_at,
                give_up=give_up,
                count_attempt=not waiting,
            )
        except BrokerError:
            # The store is down too: the claim lapses and the job is picked up again.
            log.warning("could not reschedule revocation job", extra={"job_id": job.job_id})
            return
        if give_up:
            self._failed += 1
            log.error(
                "revocation job failed",
                extra={
                    "job_id": job.job_id,
                    "instance_id": job.instance_id,
                    "error": code,
                    "attempts": job.attempts,
                },
            )
        elif not waiting:
            self._retried += 1
            log.warning(
                "revocation job will retry",
                extra={"job_id": job.job_id, "error": code, "delay_s": round(delay, 2)},
            )

    async def sweep_superseded(self) -> int:
        """Finish leases left ``revoking`` by a request that died before it revoked them
        (replaced under a role's lease limit). Returns how many were confirmed gone (a
        lease Vault had forgotten is recorded ``lost`` or ``expired``, not counted)."""
        leases = await self._ledger.superseded_leases(
            older_than=timedelta(seconds=self._settings.issuing_timeout_s)
        )
        recorded = [lease for lease in leases if lease.vault_lease_id]

        async def one(lease: LeaseView) -> object:
            return await self._ender.end_one(
                lease, actor="lease_limit", found_by="lease_limit", ours=LeaseState.REVOKED
            )

        results = await asyncio.gather(
            *(self._bounded(one, lease) for lease in recorded), return_exceptions=True
        )
        gone = [
            lease.lease_id
            for lease, ok in zip(recorded, results, strict=True)
            if isinstance(ok, Revoked)
        ]
        for lease, ok in zip(recorded, results, strict=True):
            if ok is None or isinstance(ok, BaseException):
                log.warning(
                    "a replaced lease is still not revoked",
                    extra={
                        "lease_id": lease.lease_id,
                        "error": ok.code
                        if isinstance(ok, BrokerError)
                        else type(ok).__name__
                        if isinstance(ok, BaseException)
                        else "still_in_vault",
                    },
                )
        return await self._ledger.mark_leases_ended(gone, LeaseState.REVOKED, actor="lease_limit")

    async def _revoke(self, vault_lease_id: str) -> bool:
        await self._vault.revoke_lease(vault_lease_id)  # sync: done when it returns
        return True

    async def _revoke_leases(self, recorded: list[LeaseView]) -> list[bool | BrokerError]:
        """Step 1, one bounded chunk at a time: the chunk's leases are stamped
        (``revoke_sent_at``) right before their revocations are sent, and a lease whose
        revocation certainly did not take effect (Vault refused it, or the connection was
        refused) has its stamp taken back. Vault away ends the pass after its chunk: the
        leases of later chunks were never stamped, so a retry still looks them up first."""
        outcomes: list[bool | BrokerError] = []
        for start in range(0, len(recorded), VAULT_CONCURRENCY):
            chunk = recorded[start : start + VAULT_CONCURRENCY]
            stamp = await self._ender.stamp(
                [lease.lease_id for lease in chunk if lease.revoke_sent_at is None]
            )
            answers = await asyncio.gather(
                *(self._bounded(self._revoke, str(lease.vault_lease_id)) for lease in chunk),
                return_exceptions=True,
            )
            await self._ender.unstamp(
                stamp,
                [
                    lease.lease_id
                    for lease, answer in zip(chunk, answers, strict=True)
                    if sent_for_certain_not(answer)
                ],
            )
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
        token), so a stamp never stands for a revocation that was not sent."""
        live = [token for token in tokens if token.revoked_at is None]
        unknown: set[str] = set()
        floating = [
            lease.lease_id
            for lease in (*uncovered, *issuing)
            if lease.token_accessor is None and lease.revoke_sent_at is None
        ]
        for token in live:
            mine = [
                lease.lease_id
                for lease in uncovered
                if lease.token_accessor == token.accessor and lease.revoke_sent_at is None
            ]
            stamp = await self._ender.stamp([*mine, *floating])
            try:
                known = await self._vault.revoke_accessor(token.accessor)
            except BrokerError as exc:
                if sent_for_certain_not(exc):
                    await self._ender.unstamp(stamp)
                raise
            if known:
                floating = []  # covered by this token's revocation, or by a later one's
            else:
                # Vault no longer knows the token: nothing it held is revoked by this
                # call, and retrying cannot change that; its leases are looked at alone.
                log.warning(
                    "Vault no longer knew an instance token; its leases are checked one by one",
                    extra={"token_accessor": token.accessor},
                )
                await self._ender.unstamp(stamp)
                unknown.add(token.accessor)
            confirmed.tokens.append(token.accessor)
        return unknown

    async def _revoke_instance(self, job: JobView, confirmed: Confirmed) -> None:
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
        first = await self._revoke_leases(alone)
        outcomes.update((lease.lease_id, o) for lease, o in zip(alone, first, strict=True))
        refused = [
            lease
            for lease, outcome in zip(alone, first, strict=True)
            if lease.revoke_sent_at is None and isinstance(outcome, BrokerError)
        ]
        unknown = await self._revoke_tokens(work.tokens, [*by_token, *refused], issuing, confirmed)
        # A token Vault no longer knew revoked nothing: the leases left to it are revoked
        # one by one (their stamp was taken back), as if never left to it.
        untaken = [lease for lease in by_token if lease.token_accessor in unknown]
        if untaken:
            late = await self._revoke_leases(untaken)
            outcomes.update((lease.lease_id, o) for lease, o in zip(untaken, late, strict=True))
            by_token = [lease for lease in by_token if lease.token_accessor not in unknown]
        # Then Vault's word on each: a lease it no longer holds is gone (the token's
        # revocation may also have taken one whose own revocation was refused). The leases
        # left to the token are waited for while Vault works through them; what it still
        # holds after that is revoked explicitly, for Vault's own answer.
        # A LIST's silence about a lease is taken for gone only where a LIST of this pass
        # showed it, or Vault answered its synchronous revocation; any other is looked up.
        ids = [str(lease.vault_lease_id) for lease in recorded]
        trusted = set(listed) | {
            str(lease.vault_lease_id) for lease in recorded if outcomes.get(lease.lease_id) is True
        }
        held = await self._holdings.held(ids, trusted=trusted)
        if by_token and held:
            held = await self._holdings.wait_for_queue(
                [i for i in ids if i in held], trusted=trusted
            )
            stragglers = [lease for lease in by_token if lease.vault_lease_id in held]
            if stragglers:
                late = await self._revoke_leases(stragglers)
                outcomes.update(
                    (lease.lease_id, o) for lease, o in zip(stragglers, late, strict=True)
                )
                held = await self._holdings.held(ids, trusted=trusted)
        gone = [lease for lease in recorded if lease.vault_lease_id not in held]
        # A lease that is also an STS session (Vault's revoke of it is a no-op at AWS) waits
        # for its deny before it counts as revoked.
        confirmed.leases.extend(lease.lease_id for lease in gone if lease.external_ref is None)
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
