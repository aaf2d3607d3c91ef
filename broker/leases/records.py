"""The ledgers of issuance, reconciliation, sightings and replay: one small class per
consumer, each method one transaction on the ``Database`` running that consumer's SQL
(``broker.leases.sql``). A consumer is handed only its own ledger and declares what it
uses as a ``Protocol`` next to its code. Termination's and the revocation worker's
ledgers are in ``broker.leases.termination_records``, the admin API's in
``broker.leases.admin_records``, the audit's in ``broker.leases.audit_records``; every one
of them is gathered in ``broker.leases.ledgers.Ledgers``.

Operations that span tables (``begin_issue``, ``request_termination``, ``finish_job``...)
stay one transaction, so their locking and ordering invariants are those of the SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError

from broker.clock import Clock
from broker.leases import chain as chain_math
from broker.leases.database import Database, GeneralCase
from broker.leases.locks import LockSubject
from broker.leases.sql import (
    common,
    issuance,
    locks,
    onetrip,
    reconcile,
    replay,
    revocation,
)
from broker.leases.states import LeaseState
from broker.leases.views import (
    IssueTicket,
    IssuingRow,
    LeaseLimit,
    LeaseView,
    new_id,
)


async def end_leases(
    db: Database, clock: Clock, lease_ids: Sequence[str], state: LeaseState, actor: str
) -> int:
    """Move live leases to a final state, in one transaction; how many moved."""
    if not lease_ids:
        return 0
    now = clock.now()
    async with db.transaction() as conn:
        return await revocation.mark_leases_ended(
            conn, clock, lease_ids, state, actor=actor, now=now
        )


class IssuanceRecords:
    """Issuance: the ``issuing`` row before Vault is asked and its outcome, instance-token
    accessors, and a lease's renewal and release by its workload.

    ``token_key``: the key that names a token id in the audit (``chain.token_ref``); None:
    the audit names no token id."""

    def __init__(self, db: Database, clock: Clock, token_key: bytes | None = None) -> None:
        self._db = db
        self._clock = clock
        self._token_key = token_key

    async def begin_issue(
        self,
        *,
        instance_id: str,
        issuer_name: str,
        workload: str,
        role: str,
        kind: str,
        token_id: tuple[str, datetime] | None = None,
        limit: LeaseLimit | None = None,
        external_ref: dict[str, Any] | None = None,
        vault_path: str | None = None,
        lock_subject: LockSubject | None = None,
        claims: dict[str, Any] | None = None,
    ) -> IssueTicket:
        """Write the ``issuing`` row before Vault is asked. Refuses a tombstoned instance,
        and a token id (``jti``, with the token's expiry) already used for an exchange: the
        id is recorded in this same transaction, so a refused request records nothing.

        With a ``limit``, the instance's live leases of the role are counted under an
        exclusive lock on the instance (two requests of one instance cannot both see room):
        at the limit the request is refused, or the oldest active leases are moved to
        ``revoking`` for the caller to revoke once the new one is issued.

        ``external_ref`` names what termination must act on outside Vault (an STS
        session), recorded with the row so that even a crash mid-issue leaves it known.

        ``lock_subject``: refused (``Locked``) if an active lock matches it, read in this
        same transaction, so a lock holds on every replica from the moment it commits.

        ``claims`` (``broker.identity.recorded``) are recorded on an instance seen for the
        first time, for selecting it later by claim."""
        lease_id = new_id("l")
        row = IssuingRow(instance_id, issuer_name, workload, role, kind)
        if self._db.one_trip is not None:
            try:
                await onetrip.begin_issue(
                    self._db.one_trip,
                    lease_id,
                    row,
                    now=self._clock.now(),
                    token_id=token_id,
                    limit=limit,
                    external_ref=external_ref,
                    vault_path=vault_path,
                    claims=claims,
                )
                return IssueTicket(lease_id, (), row)
            except GeneralCase:
                pass  # nothing written: the general path decides (and says why)
        async with self._db.transaction() as conn:
            superseded = await issuance.begin_issue(
                conn,
                self._clock,
                lease_id,
                instance_id=instance_id,
                issuer_name=issuer_name,
                workload=workload,
                role=role,
                kind=kind,
                token_id=token_id,
                limit=limit,
                external_ref=external_ref,
                vault_path=vault_path,
                lock_subject=lock_subject,
                claims=claims,
            )
        return IssueTicket(lease_id, tuple(superseded), row)

    async def refuse_if_locked(self, subject: LockSubject) -> None:
        """Raise ``Locked`` if an active lock matches (a renewal's check)."""
        async with self._db.transaction(readonly=True) as conn:
            await locks.refuse_if_locked(conn, subject, self._clock.now())

    async def record_token(self, *, instance_id: str, accessor: str, expires_at: datetime) -> None:
        """Record an instance token's accessor before the token is used.
        Raises ``InstanceTerminated`` if the instance was tombstoned meanwhile."""
        if self._db.one_trip is not None:
            try:
                await onetrip.record_token(
                    self._db.one_trip,
                    now=self._clock.now(),
                    instance_id=instance_id,
                    accessor=accessor,
                    expires_at=expires_at,
                )
                return
            except GeneralCase:
                pass  # nothing written: the general path decides (and says why)
        async with self._db.transaction() as conn:
            await issuance.record_token(
                conn, self._clock, instance_id=instance_id, accessor=accessor, expires_at=expires_at
            )

    async def complete_issue(
        self,
        lease_id: str,
        *,
        vault_lease_id: str | None,
        accessor: str,
        renewable: bool,
        issued_at: datetime,
        expires_at: datetime,
        state: LeaseState = LeaseState.ACTIVE,
        created_after: datetime | None = None,
        engine: str | None = None,
        token_id: tuple[str, str] | None = None,
        lock_subject: LockSubject | None = None,
        credential_ref: dict[str, str] | None = None,
        issuing: IssuingRow | None = None,
    ) -> bool:
        """Mark the lease active (or ``delivered``, for a credential without a Vault lease).
        Returns whether its instance is still active: if not, a revocation job is already on
        its way and the credential must not be handed out. ``created_after``: a row written
        before then (its request outlived the issuing bound) is not completed.
        The ``lease.issued`` audit event is written with it: the issuer, workload, role,
        ``engine``, and the token id (issuer, jti) only as a keyed hash. ``credential_ref``:
        the credential's non-secret identifier (``Engine.identifier``). ``issuing``: the row
        as ``begin_issue`` wrote it (its ticket's), which lets PostgreSQL complete it in one
        round trip."""
        ref = None
        if token_id is not None and self._token_key is not None:
            ref = chain_math.token_ref(self._token_key, token_id[0], token_id[1])
        if self._db.one_trip is not None and issuing is not None:
            try:
                return await onetrip.complete_issue(
                    self._db.one_trip,
                    lease_id,
                    issuing,
                    now=self._clock.now(),
                    vault_lease_id=vault_lease_id,
                    accessor=accessor,
                    renewable=renewable,
                    issued_at=issued_at,
                    expires_at=expires_at,
                    state=state,
                    stale=created_after or issuance.EPOCH,
                    engine=engine,
                    token_ref=ref,
                    credential_ref=credential_ref,
                )
            except GeneralCase:
                pass  # nothing written: the general path decides (and says why)
        async with self._db.transaction() as conn:
            return await issuance.complete_issue(
                conn,
                self._clock,
                lease_id,
                vault_lease_id=vault_lease_id,
                accessor=accessor,
                renewable=renewable,
                issued_at=issued_at,
                expires_at=expires_at,
                state=state,
                created_after=created_after,
                engine=engine,
                token_ref=ref,
                lock_subject=lock_subject,
                credential_ref=credential_ref,
            )

    async def fail_issue(
        self, lease_id: str, code: str, *, release_token_id: tuple[str, str] | None = None
    ) -> None:
        """Nothing was issued. ``release_token_id`` (issuer, jti) gives the token back, so a
        workload can retry a refused exchange with the token it has."""
        async with self._db.transaction() as conn:
            await issuance.fail_issue(
                conn, self._clock, lease_id, code, release_token_id=release_token_id
            )

    async def get_lease(self, lease_id: str) -> LeaseView:
        async with self._db.transaction(readonly=True) as conn:
            return await issuance.get_lease(conn, lease_id)

    async def instance_state(self, instance_id: str) -> tuple[str, str | None] | None:
        """(state, issuer) of an instance, or None if the broker never saw it."""
        async with self._db.transaction(readonly=True) as conn:
            return await issuance.instance_state(conn, instance_id)

    async def set_lease_expiry(
        self,
        lease_id: str,
        expires_at: datetime,
        renewable: bool,
        lock_subject: LockSubject | None = None,
    ) -> str | None:
        """The id of a lock matching ``lock_subject`` that appeared meanwhile, or None."""
        async with self._db.transaction() as conn:
            return await issuance.set_lease_expiry(
                conn, self._clock, lease_id, expires_at, renewable, lock_subject
            )

    async def end_lease(self, lease_id: str, state: LeaseState, actor: str) -> bool:
        """Move a live lease to a final state. False if it was no longer live."""
        async with self._db.transaction() as conn:
            return await issuance.end_lease(conn, self._clock, lease_id, state, actor)


class ReconcileRecords:
    """The reconciler: leases past expiry, stuck ``issuing`` rows, the store's view of
    Vault's leases, and instances gone unseen."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    def try_exclusive(self, key: str) -> AbstractAsyncContextManager[bool]:
        """A lock across replicas, not waited for (``Database.try_exclusive``)."""
        return self._db.try_exclusive(key)

    async def past_expiry(self, *, before: datetime, limit: int) -> list[LeaseView]:
        """Leases still counted live (``active``, ``revoking``) whose expiry passed before
        ``before``: the reconciler confirms with Vault that they are gone."""
        async with self._db.transaction(readonly=True) as conn:
            return await reconcile.past_expiry(conn, before=before, limit=limit)

    async def correct_expiry(self, lease_id: str, expires_at: datetime) -> None:
        """Vault holds the lease longer than the store thought (renewed meanwhile)."""
        async with self._db.transaction() as conn:
            await reconcile.correct_expiry(conn, self._clock, lease_id, expires_at)

    async def mark_leases_ended(
        self, lease_ids: Sequence[str], state: LeaseState, *, actor: str
    ) -> int:
        """As ``RevocationJobRecords.mark_leases_ended``."""
        return await end_leases(self._db, self._clock, lease_ids, state, actor)

    async def stuck_issuing(
        self, *, created_before: datetime, limit: int
    ) -> list[tuple[LeaseView, str]]:
        """``issuing`` rows older than their request's deadline, with their instance's
        state: their request died (or gave up) before recording Vault's answer."""
        async with self._db.transaction(readonly=True) as conn:
            return await reconcile.stuck_issuing(conn, created_before=created_before, limit=limit)

    async def settle_stuck(self, lease_id: str, *, revoked: Sequence[str], actor: str) -> bool:
        """An ``issuing`` row whose request is dead: ``abandoned``, with what was revoked
        for it in Vault (the leases issued for it that nobody recorded)."""
        async with self._db.transaction() as conn:
            return await reconcile.settle_stuck(
                conn, self._clock, lease_id, revoked=revoked, actor=actor
            )

    async def vault_lease_states(self, vault_lease_ids: Sequence[str]) -> dict[str, str]:
        """For Vault lease ids, the state of the lease row that recorded each (absent: the
        store never recorded it)."""
        async with self._db.transaction(readonly=True) as conn:
            return await reconcile.vault_lease_states(conn, vault_lease_ids)

    async def vault_paths(self) -> set[str]:
        """Every Vault path under which Vault gave the broker a lease."""
        async with self._db.transaction(readonly=True) as conn:
            return await reconcile.vault_paths(conn)

    async def unsent_live_under(
        self,
        path: str,
        *,
        expiring_after: datetime,
        after: tuple[datetime, str] | None = None,
        limit: int,
    ) -> tuple[list[LeaseView], tuple[datetime, str] | None]:
        """Live leases directly under ``path`` with no revocation sent, expiring after
        ``expiring_after``: the ones Vault's listing of ``path`` must show. A page from
        the cursor ``after``, with the next page's cursor (None: that was the last)."""
        async with self._db.transaction(readonly=True) as conn:
            return await reconcile.unsent_live_under(
                conn, path, expiring_after=expiring_after, after=after, limit=limit
            )

    async def record_audit(self, actor: str, action: str, **detail: Any) -> None:
        async with self._db.transaction() as conn:
            await common.audit(conn, self._clock, actor, action, **detail)

    async def unseen_instances(
        self, issuer_name: str, *, seen_before: datetime, limit: int
    ) -> list[str]:
        """Active instances of the issuer not seen since ``seen_before``."""
        async with self._db.transaction(readonly=True) as conn:
            return await reconcile.unseen_instances(
                conn, issuer_name, seen_before=seen_before, limit=limit
            )


class SightingRecords:
    """When instances were last seen (``broker.liveness.sightings`` flushes into it)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def mark_seen(self, instance_ids: Sequence[str], at: datetime) -> None:
        """Record that these instances exchanged or renewed (batched by each replica)."""
        if not instance_ids:
            return
        async with self._db.transaction() as conn:
            await reconcile.mark_seen(conn, instance_ids, at)


class ReplayRecords:
    """Keys used once, shared by every replica: token ids (written by ``begin_issue``)
    and the event webhook's signatures, each under its own namespace."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    async def is_used(self, namespace: str, key: str) -> bool:
        async with self._db.transaction(readonly=True) as conn:
            return await replay.is_used(conn, namespace, key)

    async def use_once(self, namespace: str, key: str, *, keep_until: datetime) -> bool:
        """Remember ``key`` until ``keep_until``; False if it was already remembered (a
        replay). Shares the replay record of token ids, under its own namespace."""
        try:
            async with self._db.transaction() as conn:
                await replay.remember(conn, namespace, key, keep_until)
        except IntegrityError:
            return False
        return True

    async def prune_seen_tokens(self, *, grace: timedelta) -> int:
        """Forget token ids whose tokens expired (plus the leeway): they can no longer be
        presented, so their replay record has done its work."""
        async with self._db.transaction() as conn:
            return await replay.forget_expired(conn, self._clock.now() - grace)


__all__ = [
    "IssuanceRecords",
    "ReconcileRecords",
    "ReplayRecords",
    "SightingRecords",
]
