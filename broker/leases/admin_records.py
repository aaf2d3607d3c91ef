"""The admin API's ledgers: its reads, its retry of a failed job, locks, the metrics'
counts (``AdminRecords``), and bulk termination by selection (``SelectionRecords``).
Each method is one transaction on the ``Database`` running the SQL of
``broker.leases.sql``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from broker.clock import Clock
from broker.leases.database import Database
from broker.leases.selection import BlastRadius, Selection, TerminationBatch
from broker.leases.sql import admin, common, issuance, jobs, locks, selection
from broker.leases.views import (
    InstanceListing,
    InstanceView,
    JobView,
    LeaseGroups,
    LeaseView,
    LockView,
    StoreCounts,
)


class AdminRecords:
    """The admin API's reads, its retry of a failed job, and the metrics' counts."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    async def get_instance(
        self, instance_id: str
    ) -> tuple[InstanceView, list[LeaseView], JobView | None]:
        """The instance, its leases and its job, read job first: each statement sees what
        was committed when it ran, and a job marked done commits with its instance's
        ``terminated`` and after its leases' final states, so a done job is never shown
        beside a ``terminating`` instance or a live lease."""
        async with self._db.transaction(readonly=True) as conn:
            return await admin.get_instance(conn, instance_id)

    async def list_leases(
        self,
        *,
        instance: str | None = None,
        workload: str | None = None,
        role: str | None = None,
        state: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[LeaseView]:
        async with self._db.transaction(readonly=True) as conn:
            return await admin.list_leases(
                conn,
                instance=instance,
                workload=workload,
                role=role,
                state=state,
                limit=limit,
                after=after,
            )

    async def list_jobs(
        self,
        *,
        state: str | None = None,
        limit: int = 100,
        instance: str | None = None,
        since: datetime | None = None,
        after: tuple[datetime, str] | None = None,
    ) -> list[JobView]:
        async with self._db.transaction(readonly=True) as conn:
            return await admin.list_jobs(
                conn, state=state, limit=limit, instance=instance, since=since, after=after
            )

    async def list_instances(
        self,
        *,
        state: str | None = None,
        workload: str | None = None,
        issuer: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        after: tuple[datetime, str] | None = None,
    ) -> list[InstanceListing]:
        """Instances with their lease counts by state, page and counts read together."""
        async with self._db.transaction(readonly=True) as conn:
            return await admin.list_instances(
                conn,
                state=state,
                workload=workload,
                issuer=issuer,
                since=since,
                limit=limit,
                after=after,
            )

    async def count_leases(
        self, *, group_by: str, states: Sequence[str], top: int
    ) -> LeaseGroups:
        async with self._db.transaction(readonly=True) as conn:
            return await admin.count_leases(conn, group_by=group_by, states=states, top=top)

    async def get_lease(self, lease_id: str) -> LeaseView:
        async with self._db.transaction(readonly=True) as conn:
            return await issuance.get_lease(conn, lease_id)

    async def instance_standing(
        self, instance_id: str
    ) -> tuple[InstanceView, JobView | None] | None:
        """The instance and its job (no leases), or None if the broker never saw it."""
        async with self._db.transaction(readonly=True) as conn:
            return await admin.instance_standing(conn, instance_id)

    async def retry_job(
        self,
        job_id: str,
        *,
        actor: str,
        reason: str | None = None,
        incident: str | None = None,
    ) -> JobView:
        """Put a ``failed`` job back in the queue, with its attempts counted from zero."""
        async with self._db.transaction() as conn:
            return await jobs.retry_job(
                conn, self._clock, job_id, actor=actor, reason=reason, incident=incident
            )

    async def record_audit(self, actor: str, action: str, **detail: Any) -> None:
        """One audit event of its own (an admin refusal, a reconcile an operator asked for)."""
        async with self._db.transaction() as conn:
            await common.audit(conn, self._clock, actor, action, **detail)

    async def create_lock(
        self,
        *,
        kind: str,
        value: str,
        claim: str | None,
        reason: str,
        incident: str | None,
        expires_at: datetime | None,
        actor: str,
    ) -> LockView:
        async with self._db.transaction() as conn:
            return await locks.create_lock(
                conn,
                self._clock,
                kind=kind,
                value=value,
                claim=claim,
                reason=reason,
                incident=incident,
                expires_at=expires_at,
                actor=actor,
            )

    async def list_locks(self, *, include_inactive: bool = False) -> list[LockView]:
        """Active locks; with ``include_inactive`` also removed and expired ones."""
        async with self._db.transaction(readonly=True) as conn:
            return await locks.list_locks(
                conn, self._clock.now(), include_inactive=include_inactive
            )

    async def active_locks(self) -> list[LockView]:
        async with self._db.transaction(readonly=True) as conn:
            return await locks.active_locks(conn, self._clock.now())

    async def remove_lock(
        self, lock_id: str, *, actor: str, reason: str | None, incident: str | None
    ) -> LockView:
        async with self._db.transaction() as conn:
            return await locks.remove_lock(
                conn, self._clock, lock_id, actor=actor, reason=reason, incident=incident
            )

    async def counts(self) -> StoreCounts:
        now = self._clock.now()
        async with self._db.transaction(readonly=True) as conn:
            return await admin.counts(conn, now)


class SelectionRecords:
    """Bulk termination: a selection's blast radius, and its termination in bounded
    batches, one transaction per batch (never one for the whole set)."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    async def blast_radius(self, chosen: Selection, *, top: int, sample: int) -> BlastRadius:
        """Aggregates over the selection, in one read transaction."""
        async with self._db.transaction(readonly=True) as conn:
            return await selection.blast_radius(conn, chosen, top=top, sample=sample)

    async def never_seen(self, instance_ids: Sequence[str]) -> list[str]:
        """Of these ids, those the broker never saw (no row, or only a tombstone)."""
        async with self._db.transaction(readonly=True) as conn:
            return await selection.never_seen(conn, instance_ids)

    async def terminate_next(
        self,
        chosen: Selection,
        *,
        after: str | None,
        limit: int,
        actor: str,
        reason: str | None,
        incident: str | None,
        check: Callable[[int], None],
    ) -> TerminationBatch:
        """Tombstone the next ``limit`` active instances of the selection past ``after``,
        each with its revocation job and audit event, in one transaction. ``check`` sees
        how many instances the selection still reaches first, and may refuse (raise)."""
        async with self._db.transaction() as conn:
            return await selection.terminate_next(
                conn,
                self._clock,
                chosen,
                after=after,
                limit=limit,
                actor=actor,
                reason=reason,
                incident=incident,
                check=check,
            )


__all__ = ["AdminRecords", "SelectionRecords"]
