"""Termination's ledgers: the tombstone with its revocation job (``TerminationRecords``,
for every termination source) and the revocation worker's claims, passes and job ends
(``RevocationJobRecords``). As in ``broker.leases.records``, each method is one
transaction, or one round trip on PostgreSQL where ``broker.leases.sql.onetrip`` serves
the common case.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta

from broker.clock import Clock
from broker.leases.database import Database, GeneralCase
from broker.leases.records import end_leases
from broker.leases.sql import jobs, onetrip, reconcile, revocation, selection
from broker.leases.states import LeaseState
from broker.leases.views import JobView, LeasesStillLive, LeaseView, RevocationWork, Termination


class TerminationRecords:
    """Termination sources: the tombstone with its revocation job, and which instances of
    an issuer are still active (for a source that relists what exists)."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    async def request_termination(
        self,
        instance_id: str,
        *,
        actor: str,
        issuer: str | None = None,
        workload: str | None = None,
        token_id: tuple[str, datetime] | None = None,
        reason: str | None = None,
        incident: str | None = None,
        self_terminated: bool = False,
    ) -> Termination:
        """Tombstone the instance and create its revocation job, in one transaction; the
        job, and whether the broker never saw the instance (read in that transaction).
        Idempotent: a second call returns the existing job (re-queued if it had failed).
        With ``issuer`` (an event source speaking for one issuer's instances), an instance
        that another issuer owns is refused and left untouched; one the broker never saw
        is tombstoned for that issuer. An instance ending itself adds its ``workload``
        (checked like ``issuer``, and recorded for an instance never seen) and its token
        id, used once like an exchange's; ``reason`` and ``incident`` (an incident
        reference) are written on the job and into the audit event."""
        if self._db.one_trip is not None:
            try:
                served = await onetrip.request_termination(
                    self._db.one_trip,
                    self._clock,
                    instance_id,
                    actor=actor,
                    issuer=issuer,
                    workload=workload,
                    token_id=token_id,
                    reason=reason,
                    incident=incident,
                    self_terminated=self_terminated,
                )
                if served is not None:
                    return Termination(*served)
            except GeneralCase:
                pass  # nothing written: the general path decides (and says why)
        async with self._db.transaction() as conn:
            job = await jobs.request_termination(
                conn,
                self._clock,
                instance_id,
                actor=actor,
                issuer=issuer,
                workload=workload,
                token_id=token_id,
                reason=reason,
                incident=incident,
                self_terminated=self_terminated,
            )
            return Termination(job, bool(await selection.never_seen(conn, [instance_id])))

    async def active_instance_ids(self, issuer_name: str) -> set[str]:
        """Ids of the issuer's instances that are still active (for a source that relists
        what exists and terminates what the broker knows but the source no longer has)."""
        async with self._db.transaction(readonly=True) as conn:
            return await reconcile.active_instance_ids(conn, issuer_name)


class RevocationJobRecords:
    """The revocation worker: claims on jobs, what a job revokes, and its outcome."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    def exclusive(self, key: str, *, timeout_s: int = 30) -> AbstractAsyncContextManager[None]:
        """A lock across replicas around a read-modify-write outside the database
        (``Database.exclusive``)."""
        return self._db.exclusive(key, timeout_s=timeout_s)

    async def claim_jobs(self, *, worker: str, limit: int, claim_for: timedelta) -> list[JobView]:
        """Claim due jobs (and running ones whose claim lapsed: their worker died).
        ``SKIP LOCKED`` lets replicas claim disjoint sets; the conditional update makes a
        claim exclusive on SQLite too."""
        async with self._db.transaction() as conn:
            return await jobs.claim_jobs(
                conn, self._clock, worker=worker, limit=limit, claim_for=claim_for
            )

    async def extend_claim(self, job: JobView, *, worker: str, claim_for: timedelta) -> bool:
        """Keep a claim alive while its worker is still at the job. False if the claim is
        no longer this worker's (it lapsed and another worker took it)."""
        async with self._db.transaction() as conn:
            return await jobs.extend_claim(
                conn, self._clock, job, worker=worker, claim_for=claim_for
            )

    async def revocation_work(self, instance_id: str) -> RevocationWork:
        async with self._db.transaction(readonly=True) as conn:
            return await revocation.revocation_work(conn, instance_id)

    async def mark_leases_ended(
        self, lease_ids: Sequence[str], state: LeaseState, *, actor: str
    ) -> int:
        """Move leases to a final state, only from a state that may lead to it: a lease
        that became ``active`` meanwhile is never marked ``abandoned``. Returns how many
        rows moved; the caller compares with how many it asked for. The audit gets one
        event per instance naming exactly the leases that moved, so a lease revoked twice
        in effect would show up twice."""
        return await end_leases(self._db, self._clock, lease_ids, state, actor)

    async def finish_job(
        self,
        job: JobView,
        *,
        worker: str,
        tokens: Sequence[str] = (),
        revoked: Sequence[str] = (),
        actor: str | None = None,
    ) -> bool:
        """Record what the pass confirmed (``tokens`` revoked, leases ``revoked``, by
        ``actor``), then mark the job done and the instance terminated: one transaction,
        so a job's end costs one commit and one append to the audit chain (one round
        trip, on PostgreSQL's common case: ``onetrip.finish_job``). Refuses
        (``LeasesStillLive``) while any lease of the instance is still ``issuing`` or
        ``active``, after recording what was confirmed: the instance row is locked
        first, so no request can complete a lease between check and finish."""
        actor = actor or f"revocation:{worker}"
        if self._db.one_trip is not None:
            try:
                await onetrip.finish_job(
                    self._db.one_trip,
                    self._clock,
                    job,
                    worker=worker,
                    tokens=tokens,
                    revoked=revoked,
                    actor=actor,
                )
                return True
            except GeneralCase:
                pass  # nothing written: the general path decides (and records what moved)
        async with self._db.transaction() as conn:
            live = await revocation.record_confirmed(
                conn,
                self._clock,
                job.instance_id,
                tokens=tokens,
                revoked=revoked,
                actor=actor,
            )
            if not live:
                return await jobs.finish_job(conn, self._clock, job, worker=worker)
        raise LeasesStillLive(f"{live} lease(s) of the instance are still live")

    async def record_confirmed(
        self, instance_id: str, *, tokens: Sequence[str], revoked: Sequence[str], actor: str
    ) -> None:
        """What a pass confirmed before it stopped short of the job's end (tokens revoked,
        leases ``revoked``), in one transaction."""
        if not tokens and not revoked:
            return
        async with self._db.transaction() as conn:
            await revocation.record_confirmed(
                conn, self._clock, instance_id, tokens=tokens, revoked=revoked, actor=actor
            )

    async def reschedule_job(
        self,
        job: JobView,
        *,
        worker: str,
        error: str,
        next_attempt_at: datetime,
        give_up: bool,
        count_attempt: bool = True,
    ) -> None:
        """Put a claimed job back. ``count_attempt=False`` for a pass that only waited (for
        in-flight issuance): it takes back the attempt its claim counted."""
        async with self._db.transaction() as conn:
            await jobs.reschedule_job(
                conn,
                self._clock,
                job,
                worker=worker,
                error=error,
                next_attempt_at=next_attempt_at,
                give_up=give_up,
                count_attempt=count_attempt,
            )

    async def superseded_leases(
        self, *, older_than: timedelta, limit: int = 200
    ) -> list[LeaseView]:
        """Leases left in ``revoking`` longer than ``older_than``: their request died
        before it revoked them. The sweep finishes the job."""
        cutoff = self._clock.now() - older_than
        async with self._db.transaction(readonly=True) as conn:
            return await revocation.superseded_leases(conn, cutoff, limit)
