"""The revocation worker: claims jobs from its ledger and runs each one's pass over its
instance (``broker.revocation.instance``: what makes Vault forget it), records the
outcome, and retries what did not finish.

Jobs run ``batch`` at a time; a slot a finished job frees is claimed again at once
(``drain``, which stops claiming when the broker stops). Every step is idempotent, so a
worker that dies anywhere leaves a job that the next claim (after ``claim_timeout_s``)
finishes. Failures retry with exponential backoff and jitter; after ``max_attempts`` the
job is ``failed``: visible, counted, retried when asked again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Protocol

from broker.backoff import retry_delay
from broker.clock import Clock
from broker.errors import BrokerError, RevocationWaiting
from broker.leases import JobView, LeaseState, LeaseView
from broker.leases.ending import LeaseEnder, Revoked
from broker.revocation.bounded import Bounded
from broker.revocation.instance import Confirmed, InstancePass, PassLedger
from broker.revocation.sessions import SessionRevoker
from broker.revocation.settings import RevocationSettings
from broker.vault import VaultClient

log = logging.getLogger(__name__)


class RevocationJobs(PassLedger, Protocol):
    """What the worker reads and writes of the lease ledgers (``RevocationJobRecords``),
    its passes' included."""

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

    async def superseded_leases(
        self, *, older_than: timedelta, limit: int = 200
    ) -> list[LeaseView]: ...


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
        self._stopping = False
        self._pass = InstancePass(
            settings,
            ledger,
            vault,
            clock,
            ender=ender,
            bounded=self._bounded,
            actor=self.actor,
            cloud=cloud,
        )
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
        claiming = True
        try:
            while True:
                free = self._settings.batch - len(running)
                # A claim per freed slot would cost a transaction per job: claim once a
                # quarter of the slots are free (at once when none is running).
                wanted = free >= max(1, self._settings.batch // 4) or not running
                if wanted and claiming and not self._stopping:
                    try:
                        jobs = await self._ledger.claim_jobs(
                            worker=self.worker_id,
                            limit=free,
                            claim_for=timedelta(seconds=self._settings.claim_timeout_s),
                        )
                    except BrokerError as exc:
                        # The store is away: the jobs running go on (each records or
                        # reschedules what it can); the next tick claims again.
                        log.warning("could not claim revocation jobs", extra={"code": exc.code})
                        claiming, jobs = False, []
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
                    if not task.cancelled() and (failure := task.exception()) is not None:
                        log.error(
                            "a revocation job's task failed",
                            exc_info=failure,
                            extra={"job_id": job_id},
                        )
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _process(self, job: JobView) -> None:
        """The job's pass, while its claim is held; a claim lost to another worker ends
        the pass at its next safe point (the other worker runs the job now)."""
        lost = asyncio.Event()
        holding = asyncio.create_task(self._hold_claim(job, lost))
        try:
            await self._process_claimed(job, halt=lambda: self._stopping or lost.is_set())
        finally:
            holding.cancel()
            await asyncio.gather(holding, return_exceptions=True)

    async def _hold_claim(self, job: JobView, lost: asyncio.Event) -> None:
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
                    log.warning(
                        "lost the claim on a revocation job; this worker ends its pass",
                        extra={"job_id": job.job_id},
                    )
                    lost.set()
                    return
            except BrokerError:
                continue  # the store is away: the claim may lapse; the guards still hold
            except Exception:  # a bug: said, and the claim extended at the next turn
                log.exception("could not extend a revocation job's claim")

    async def _process_claimed(
        self, job: JobView, *, halt: Callable[[], bool] = lambda: False
    ) -> None:
        confirmed = Confirmed(halt=halt)
        try:
            await self._pass.revoke_instance(job, confirmed)
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
