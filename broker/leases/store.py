"""The lease store on SQLAlchemy (SQLite by default, PostgreSQL in production).

Every method is one short transaction. SQLAlchemy and driver errors are translated to
``StoreUnavailable`` here; nothing above this module sees them.

Concurrency: issuance locks the instance row (``FOR UPDATE`` on PostgreSQL; SQLite takes
the database write lock with ``BEGIN IMMEDIATE``) while it checks the tombstone and writes
the ``issuing`` row, and termination takes the same lock to mark the instance
``terminating``. So a lease is either recorded before the instance is marked (and the
revocation job sees it) or refused.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, event, func, or_, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from broker.clock import Clock, iso_z
from broker.errors import (
    BadRequest,
    BrokerError,
    InstanceTerminated,
    LeaseLimitReached,
    NotFound,
    NotPermitted,
    RevocationWaiting,
    StoreUnavailable,
    TokenInvalid,
)
from broker.leases import models as m
from broker.leases.db import async_url, head_revision
from broker.leases.settings import StoreSettings
from broker.leases.states import (
    COUNTED_LEASE_STATES,
    LIVE_LEASE_STATES,
    InstanceState,
    JobState,
    LeaseState,
    lease_can_move,
)

# The issuance hot path runs these prebuilt statements: SQLAlchemy memoizes their cache keys,
# which per-call construction would recompute on every request.
_I, _L, _T = m.Instance.__table__, m.Lease.__table__, m.InstanceToken.__table__
_WHICH_INSTANCE = select(_I.c.state, _I.c.issuer_name, _I.c.workload).where(
    _I.c.instance_id == bindparam("b_iid")
)
_LOCK_SHARED = _WHICH_INSTANCE.with_for_update(read=True)
_LOCK_EXCLUSIVE = _WHICH_INSTANCE.with_for_update()
_INSERT_INSTANCE = _I.insert()
_INSERT_LEASE = _L.insert()
_INSERT_TOKEN = _T.insert()
_INSERT_SEEN = m.SeenToken.__table__.insert()
_LIVE = sorted(s.value for s in LIVE_LEASE_STATES)
_COUNTED_FOR_LIMIT = (
    select(_L.c.lease_id, _L.c.vault_lease_id, _L.c.state)
    .where(
        _L.c.instance_id == bindparam("b_iid"),
        _L.c.role == bindparam("b_role"),
        _L.c.state.in_(sorted(s.value for s in COUNTED_LEASE_STATES)),
        # A credential past its expiry is gone in Vault already: it holds no slot (its row
        # stays active so that termination still settles it).
        or_(_L.c.expires_at.is_(None), _L.c.expires_at > bindparam("b_now")),
    )
    .order_by(_L.c.created_at, _L.c.lease_id)
)
_REPLACED_PENDING = select(func.count()).where(
    _L.c.instance_id == bindparam("b_iid"),
    _L.c.role == bindparam("b_role"),
    _L.c.state == LeaseState.REVOKING.value,
)
_COMPLETE_LEASE = (
    update(_L)
    .where(
        _L.c.lease_id == bindparam("b_lid"),
        _L.c.state == LeaseState.ISSUING.value,
        # Past the issuing bound the reconciler may take the row's lease for unrecorded
        # and revoke it: a request that slow records nothing and takes its lease back.
        _L.c.created_at > bindparam("b_stale"),
    )
    .values(
        state=bindparam("b_state"),
        vault_lease_id=bindparam("b_vlid"),
        token_accessor=bindparam("b_acc"),
        renewable=bindparam("b_ren"),
        issued_at=bindparam("b_iss"),
        expires_at=bindparam("b_exp"),
        updated_at=bindparam("b_now"),
    )
    .returning(_L.c.instance_id)
)


@dataclass(frozen=True)
class LeaseLimit:
    max_leases: int
    on_limit: str  # "revoke_oldest" | "refuse"


@dataclass(frozen=True)
class IssueTicket:
    lease_id: str
    superseded: tuple[tuple[str, str], ...]  # (lease_id, vault_lease_id) to revoke


class LeasesStillLive(RevocationWaiting):
    """A job cannot finish: some lease of its instance is still issuing or active."""


def _still_claimed(job: JobView, worker: str) -> Any:
    """The job is still running under this worker's claim: a worker whose claim lapsed
    (and was taken over) can neither finish nor reschedule it."""
    return (
        (m.RevocationJob.job_id == job.job_id)
        & (m.RevocationJob.state == JobState.RUNNING.value)
        & (m.RevocationJob.claimed_by == worker[:64])
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Lease ids listed in one audit event (its count is always complete).
AUDIT_MAX_IDS = 1000


def _lock_id(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _iso(dt: datetime | None) -> str | None:
    return iso_z(dt) if dt else None


@dataclass(frozen=True)
class LeaseView:
    lease_id: str
    instance_id: str
    workload: str
    role: str
    kind: str
    state: str
    renewable: bool
    created_at: datetime
    issued_at: datetime | None
    expires_at: datetime | None
    ended_at: datetime | None
    vault_lease_id: str | None
    token_accessor: str | None
    # What termination acts on outside Vault (an STS session it denies in IAM), or None.
    external_ref: dict[str, Any] | None = None
    vault_path: str | None = None  # where the credential was asked for

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("created_at", "issued_at", "expires_at", "ended_at"):
            d[k] = _iso(d[k])
        # Vault's lease id and the token accessor are operator data, not secrets, but
        # callers don't need them; admins see them through the admin API.
        d.pop("vault_lease_id")
        d.pop("token_accessor")
        d.pop("external_ref")
        d.pop("vault_path")
        return d

    def admin(self) -> dict[str, Any]:
        d = self.public()
        d["vault_lease_id"] = self.vault_lease_id
        if self.external_ref is not None:
            d["external_ref"] = self.external_ref
        return d


@dataclass(frozen=True)
class JobView:
    job_id: str
    instance_id: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    requested_by: str
    created_at: datetime
    completed_at: datetime | None

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("next_attempt_at", "created_at", "completed_at"):
            d[k] = _iso(d[k])
        return d


@dataclass(frozen=True)
class InstanceView:
    instance_id: str
    state: str
    issuer_name: str | None
    workload: str | None
    created_at: datetime
    terminated_at: datetime | None

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = _iso(self.created_at)
        d["terminated_at"] = _iso(self.terminated_at)
        return d


@dataclass(frozen=True)
class TokenView:
    accessor: str
    expires_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class RevocationWork:
    tokens: tuple[TokenView, ...]
    leases: tuple[LeaseView, ...]  # leases still live (issuing or active)


@dataclass(frozen=True)
class StoreCounts:
    leases: dict[tuple[str, str], int]  # (role, state) → count, live states only
    queue_depth: int
    oldest_job_age_s: float
    failed_jobs: int


def _lease_view(r: m.Lease) -> LeaseView:
    return LeaseView(
        r.lease_id,
        r.instance_id,
        r.workload,
        r.role,
        r.kind,
        r.state,
        r.renewable,
        r.created_at,
        r.issued_at,
        r.expires_at,
        r.ended_at,
        r.vault_lease_id,
        r.token_accessor,
        r.external_ref,
        r.vault_path,
    )


def _job_view(r: m.RevocationJob) -> JobView:
    return JobView(
        r.job_id,
        r.instance_id,
        r.state,
        r.attempts,
        r.next_attempt_at,
        r.last_error,
        r.requested_by,
        r.created_at,
        r.completed_at,
    )


def _instance_view(r: m.Instance) -> InstanceView:
    return InstanceView(
        r.instance_id, r.state, r.issuer_name, r.workload, r.created_at, r.terminated_at
    )


class Store:
    def __init__(self, settings: StoreSettings, clock: Clock) -> None:
        self._settings = settings
        self._clock = clock
        self._engine: AsyncEngine | None = None
        self.is_sqlite = settings.url.startswith("sqlite")

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        url = async_url(self._settings.url)
        if self.is_sqlite:
            engine = create_async_engine(url, connect_args={"timeout": 30})
            _sqlite_pragmas(engine)
        else:
            # No pre-ping: it costs a round trip per transaction. A connection that died
            # with the server fails one request (503), and SQLAlchemy then discards the pool.
            engine = create_async_engine(
                url,
                pool_size=self._settings.pool_size,
                max_overflow=self._settings.pool_size,
                pool_timeout=self._settings.connect_timeout_s,
                pool_recycle=1800,
                connect_args={
                    "timeout": self._settings.connect_timeout_s,
                    "command_timeout": 30,
                    "server_settings": {"application_name": "credential-broker"},
                },
            )
        self._engine = engine

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    @asynccontextmanager
    async def _tx(self, *, readonly: bool = False) -> AsyncIterator[AsyncConnection]:
        """One transaction. ``readonly`` ones on SQLite start with a plain ``BEGIN``, so
        queries (admin listings, metrics) never hold the write lock issuance needs."""
        if self._engine is None:
            raise StoreUnavailable("the lease store is not started")
        try:
            async with self._engine.connect() as conn:
                if readonly:
                    await conn.execution_options(broker_readonly=True)
                async with conn.begin():
                    yield conn
        except BrokerError:
            raise
        except IntegrityError:
            raise
        except (DBAPIError, SQLAlchemyError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(
                f"the lease store is unavailable ({type(exc).__name__}); retry shortly",
                code="store_unavailable",
            ) from None

    @asynccontextmanager
    async def exclusive(self, key: str, *, timeout_s: int = 30) -> AsyncIterator[None]:
        """Hold a lock named ``key`` across replicas (a PostgreSQL advisory lock, released
        with its transaction) around a read-modify-write outside the store, such as an IAM
        policy several revocation workers edit. On SQLite, which serves one replica, the
        caller's in-process lock suffices, and the write lock is not held for it."""
        if self.is_sqlite:
            yield
            return
        async with self._tx() as conn:
            await conn.execute(text(f"SET LOCAL lock_timeout = '{int(timeout_s)}s'"))
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_id(key)})
            yield

    @asynccontextmanager
    async def try_exclusive(self, key: str) -> AsyncIterator[bool]:
        """Like ``exclusive``, but does not wait: yields False when another replica holds
        the lock (a periodic pass that one replica at a time should run)."""
        if self.is_sqlite:
            yield True
            return
        async with self._tx() as conn:
            got = (
                await conn.execute(
                    text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _lock_id(key)}
                )
            ).scalar()
            yield bool(got)

    async def ping(self) -> None:
        async with self._tx(readonly=True) as conn:
            await conn.execute(text("SELECT 1"))

    async def current_revision(self) -> str | None:
        async with self._tx(readonly=True) as conn:
            try:
                row = (await conn.execute(text("SELECT version_num FROM alembic_version"))).first()
            except SQLAlchemyError:
                return None
        return row[0] if row else None

    async def is_migrated(self) -> bool:
        try:
            return await self.current_revision() == head_revision()
        except StoreUnavailable:
            raise
        except SQLAlchemyError:
            return False

    async def _audit(
        self,
        conn: AsyncConnection,
        actor: str,
        action: str,
        *,
        instance_id: str | None = None,
        lease_id: str | None = None,
        **detail: Any,
    ) -> None:
        await conn.execute(
            m.AuditEvent.__table__.insert().values(
                at=self._clock.now(),
                actor=actor[:128],
                action=action,
                instance_id=instance_id,
                lease_id=lease_id,
                detail=detail,
            )
        )

    # -- issuance --------------------------------------------------------------------

    async def _lock_instance(
        self, conn: AsyncConnection, instance_id: str, *, shared: bool = False
    ) -> tuple[str, str | None, str | None] | None:
        """Lock the instance row; its (state, issuer, workload). Issuance takes a shared lock (many
        requests of one instance proceed together); termination an exclusive one, so it
        waits for every in-flight ``issuing`` row to commit and its job then sees them all."""
        stmt = _LOCK_SHARED if shared else _LOCK_EXCLUSIVE
        row = (await conn.execute(stmt, {"b_iid": instance_id})).first()
        return (row[0], row[1], row[2]) if row else None

    async def _ensure_instance(
        self,
        conn: AsyncConnection,
        instance_id: str,
        issuer_name: str | None,
        workload: str | None,
        state: InstanceState,
        *,
        shared: bool = False,
    ) -> tuple[str, str | None, str | None]:
        current = await self._lock_instance(conn, instance_id, shared=shared)
        if current is not None:
            return current
        now = self._clock.now()
        try:
            async with conn.begin_nested():
                await conn.execute(
                    _INSERT_INSTANCE,
                    {
                        "instance_id": instance_id,
                        "issuer_name": issuer_name,
                        "workload": workload,
                        "state": state.value,
                        "created_at": now,
                        "updated_at": now,
                        "last_seen_at": now if state == InstanceState.ACTIVE else None,
                    },
                )
        except IntegrityError:
            pass  # created concurrently: lock the winner's row below
        current = await self._lock_instance(conn, instance_id, shared=shared)
        assert current is not None
        return current

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
    ) -> IssueTicket:
        """Write the ``issuing`` row before Vault is asked. Refuses a tombstoned instance,
        and a token id (``jti``, with the token's expiry) already used for an exchange: the
        id is recorded in this same transaction, so a refused request records nothing.

        With a ``limit``, the instance's live leases of the role are counted under an
        exclusive lock on the instance (two requests of one instance cannot both see room):
        at the limit the request is refused, or the oldest active leases are moved to
        ``revoking`` for the caller to revoke once the new one is issued.

        ``external_ref`` names what termination must act on outside Vault (an STS
        session), recorded with the row so that even a crash mid-issue leaves it known."""
        lease_id = new_id("l")
        superseded: list[tuple[str, str]] = []
        async with self._tx() as conn:
            state, owner, owner_workload = await self._ensure_instance(
                conn,
                instance_id,
                issuer_name,
                workload,
                InstanceState.ACTIVE,
                shared=limit is None,
            )
            if owner is not None and owner != issuer_name:
                # Instance ids are unique only per issuer: the first issuer to present one
                # owns it, and no other issuer's token can draw on or end its leases.
                raise NotPermitted(
                    f"instance {instance_id} belongs to another issuer",
                    code="instance_issuer_mismatch",
                )
            if owner_workload is not None and owner_workload != workload:
                # An instance runs one workload; another workload presenting the same
                # instance id is a collision or an impostor, not the same instance.
                raise NotPermitted(
                    f"instance {instance_id} belongs to another workload",
                    code="instance_workload_mismatch",
                )
            if state != InstanceState.ACTIVE:
                raise InstanceTerminated(
                    f"instance {instance_id} is terminated; no new credential is issued for it"
                )
            if token_id is not None:
                try:
                    async with conn.begin_nested():
                        await conn.execute(
                            _INSERT_SEEN,
                            {
                                "issuer_name": issuer_name,
                                "jti": token_id[0],
                                "expires_at": token_id[1],
                            },
                        )
                except IntegrityError:
                    raise TokenInvalid(
                        "this token was already used for an exchange; get a fresh token",
                        code="token_replayed",
                    ) from None
            now = self._clock.now()
            if limit is not None:
                superseded = await self._make_room(conn, instance_id, role, limit, now)
            await conn.execute(
                _INSERT_LEASE,
                {
                    "lease_id": lease_id,
                    "instance_id": instance_id,
                    "workload": workload,
                    "role": role,
                    "kind": kind,
                    "state": LeaseState.ISSUING.value,
                    "renewable": False,
                    "created_at": now,
                    "updated_at": now,
                    "external_ref": external_ref,
                    "vault_path": vault_path,
                },
            )
        return IssueTicket(lease_id, tuple(superseded))

    async def _make_room(
        self, conn: AsyncConnection, instance_id: str, role: str, limit: LeaseLimit, now: datetime
    ) -> list[tuple[str, str]]:
        """Under the instance's exclusive lock: refuse, or pick the oldest active leases
        to replace, so that with the new one the role stays within its limit."""
        live = (
            await conn.execute(
                _COUNTED_FOR_LIMIT, {"b_iid": instance_id, "b_role": role, "b_now": now}
            )
        ).all()
        excess = len(live) - limit.max_leases + 1
        if excess <= 0:
            return []
        if limit.on_limit == "refuse":
            raise LeaseLimitReached(
                f"this instance already holds {len(live)} live lease(s) of role {role!r}, its "
                f"limit; release one (DELETE /v1/leases/{{lease_id}}) before asking again"
            )
        pending = (
            await conn.execute(_REPLACED_PENDING, {"b_iid": instance_id, "b_role": role})
        ).scalar_one()
        if pending >= limit.max_leases:
            # Replaced leases Vault has not confirmed gone are still live: replacing more
            # would let the live count grow without bound while revocation fails.
            raise LeaseLimitReached(
                f"{pending} replaced lease(s) of role {role!r} are not confirmed revoked yet; "
                "retry later"
            )
        victims = [(r[0], r[1]) for r in live if r[2] == LeaseState.ACTIVE.value][:excess]
        if len(victims) < excess:
            raise LeaseLimitReached(
                f"this instance's requests for role {role!r} in flight already reach its limit "
                f"of {limit.max_leases}; retry once they complete"
            )
        await conn.execute(
            update(m.Lease)
            .where(
                m.Lease.lease_id.in_([v[0] for v in victims]),
                m.Lease.state == LeaseState.ACTIVE.value,
            )
            .values(state=LeaseState.REVOKING.value, error_code="superseded", updated_at=now)
        )
        await self._audit(
            conn,
            "lease_limit",
            "leases.superseded",
            instance_id=instance_id,
            role=role,
            lease_ids=[v[0] for v in victims],
        )
        return victims

    async def superseded_leases(
        self, *, older_than: timedelta, limit: int = 200
    ) -> list[LeaseView]:
        """Leases left in ``revoking`` longer than ``older_than``: their request died
        before it revoked them. The sweep finishes the job."""
        cutoff = self._clock.now() - older_than
        async with self._tx(readonly=True) as conn:
            rows = (
                await conn.execute(
                    select(m.Lease)
                    .where(m.Lease.state == LeaseState.REVOKING.value, m.Lease.updated_at < cutoff)
                    .order_by(m.Lease.updated_at)
                    .limit(limit)
                )
            ).all()
        return [_lease_view(m.Lease(**r._mapping)) for r in rows]

    async def record_token(self, *, instance_id: str, accessor: str, expires_at: datetime) -> None:
        """Record an instance token's accessor before the token is used.
        Raises ``InstanceTerminated`` if the instance was tombstoned meanwhile."""
        async with self._tx() as conn:
            current = await self._lock_instance(conn, instance_id, shared=True)
            if current is None or current[0] != InstanceState.ACTIVE:
                raise InstanceTerminated(f"instance {instance_id} is terminated")
            await conn.execute(
                _INSERT_TOKEN,
                {
                    "accessor": accessor,
                    "instance_id": instance_id,
                    "created_at": self._clock.now(),
                    "expires_at": expires_at,
                },
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
    ) -> bool:
        """Mark the lease active (or ``delivered``, for a credential without a Vault lease).
        Returns whether its instance is still active: if not, a revocation job is already on
        its way and the credential must not be handed out. ``created_after``: a row written
        before then (its request outlived the issuing bound) is not completed.
        (The lease row is the issuance record; no separate audit row is written.)"""
        async with self._tx() as conn:
            instance_id = (
                await conn.execute(
                    _COMPLETE_LEASE,
                    {
                        "b_lid": lease_id,
                        "b_state": state.value,
                        "b_vlid": vault_lease_id,
                        "b_acc": accessor,
                        "b_ren": renewable,
                        "b_iss": issued_at,
                        "b_exp": expires_at,
                        "b_now": self._clock.now(),
                        "b_stale": created_after or _EPOCH,
                    },
                )
            ).scalar()
            if instance_id is None:
                raise StoreUnavailable(
                    "the credential could not be recorded in time (or its row changed); "
                    "it was taken back: retry",
                    code="lease_state_conflict",
                )
            # Under the shared lock: termination (exclusive) either committed before, and we
            # see it, or waits for this transaction, and its job then sees the active row.
            current = await self._lock_instance(conn, instance_id, shared=True)
            return current is not None and current[0] == InstanceState.ACTIVE.value

    async def fail_issue(
        self, lease_id: str, code: str, *, release_token_id: tuple[str, str] | None = None
    ) -> None:
        """Nothing was issued. ``release_token_id`` (issuer, jti) gives the token back, so a
        workload can retry a refused exchange with the token it has."""
        async with self._tx() as conn:
            if release_token_id is not None:
                await conn.execute(
                    m.SeenToken.__table__.delete().where(
                        m.SeenToken.issuer_name == release_token_id[0],
                        m.SeenToken.jti == release_token_id[1],
                    )
                )
            await conn.execute(
                update(m.Lease)
                .where(m.Lease.lease_id == lease_id, m.Lease.state == LeaseState.ISSUING.value)
                .values(
                    state=LeaseState.FAILED.value,
                    error_code=code[:64],
                    updated_at=self._clock.now(),
                    ended_at=self._clock.now(),
                )
            )

    # -- lease operations by their owner ---------------------------------------------

    async def get_lease(self, lease_id: str) -> LeaseView:
        async with self._tx(readonly=True) as conn:
            row = (await conn.execute(select(m.Lease).where(m.Lease.lease_id == lease_id))).first()
        if row is None:
            raise NotFound("no such lease", code="lease_not_found")
        return _lease_view(m.Lease(**row._mapping))

    async def instance_state(self, instance_id: str) -> tuple[str, str | None] | None:
        """(state, issuer) of an instance, or None if the broker never saw it."""
        async with self._tx(readonly=True) as conn:
            row = (await conn.execute(_WHICH_INSTANCE, {"b_iid": instance_id})).first()
        return (row[0], row[1]) if row else None

    async def set_lease_expiry(self, lease_id: str, expires_at: datetime, renewable: bool) -> None:
        async with self._tx() as conn:
            row = (
                await conn.execute(select(m.Lease.instance_id).where(m.Lease.lease_id == lease_id))
            ).scalar_one()
            await conn.execute(
                update(m.Lease)
                .where(m.Lease.lease_id == lease_id)
                .values(expires_at=expires_at, renewable=renewable, updated_at=self._clock.now())
            )
            await self._audit(
                conn,
                "workload",
                "lease.renewed",
                instance_id=row,
                lease_id=lease_id,
                expires_at=_iso(expires_at),
            )

    async def end_lease(self, lease_id: str, state: LeaseState, actor: str) -> bool:
        """Move a live lease to a final state. False if it was no longer live."""
        now = self._clock.now()
        async with self._tx() as conn:
            res = await conn.execute(
                update(m.Lease)
                .where(
                    m.Lease.lease_id == lease_id,
                    m.Lease.state.in_(
                        [o.value for o in LIVE_LEASE_STATES if lease_can_move(o, state)]
                    ),
                )
                .values(state=state.value, ended_at=now, updated_at=now)
            )
            if res.rowcount:
                await self._audit(conn, actor, f"lease.{state.value}", lease_id=lease_id)
            return bool(res.rowcount)

    # -- termination -----------------------------------------------------------------

    async def request_termination(
        self, instance_id: str, *, actor: str, issuer: str | None = None
    ) -> JobView:
        """Tombstone the instance and create its revocation job, in one transaction.
        Idempotent: a second call returns the existing job (re-queued if it had failed).
        With ``issuer`` (an event source speaking for one issuer's instances), an instance
        that another issuer owns is refused and left untouched; one the broker never saw
        is tombstoned for that issuer."""
        now = self._clock.now()
        async with self._tx() as conn:
            state, owner, _ = await self._ensure_instance(
                conn, instance_id, issuer, None, InstanceState.TERMINATING
            )
            if issuer is not None and owner is not None and owner != issuer:
                raise NotPermitted(
                    f"instance {instance_id} belongs to another issuer",
                    code="instance_issuer_mismatch",
                )
            if state == InstanceState.ACTIVE:
                await conn.execute(
                    update(m.Instance)
                    .where(m.Instance.instance_id == instance_id)
                    .values(state=InstanceState.TERMINATING.value, updated_at=now)
                )
            job = (
                await conn.execute(
                    select(m.RevocationJob).where(m.RevocationJob.instance_id == instance_id)
                )
            ).first()
            if job is None:
                job_id = new_id("j")
                await conn.execute(
                    m.RevocationJob.__table__.insert().values(
                        job_id=job_id,
                        instance_id=instance_id,
                        state=JobState.PENDING.value,
                        attempts=0,
                        next_attempt_at=now,
                        requested_by=actor[:64],
                        created_at=now,
                        updated_at=now,
                    )
                )
                await self._audit(
                    conn,
                    actor,
                    "instance.terminate_requested",
                    instance_id=instance_id,
                    job_id=job_id,
                )
            elif job.state == JobState.FAILED.value:
                await self._requeue(conn, job.job_id, instance_id, actor, now)
            row = (
                await conn.execute(
                    select(m.RevocationJob).where(m.RevocationJob.instance_id == instance_id)
                )
            ).one()
            return _job_view(m.RevocationJob(**row._mapping))

    async def _requeue(
        self, conn: AsyncConnection, job_id: str, instance_id: str, actor: str, now: datetime
    ) -> None:
        """A failed job back in the queue, its attempts counted from zero."""
        await conn.execute(
            update(m.RevocationJob)
            .where(
                m.RevocationJob.job_id == job_id,
                m.RevocationJob.state == JobState.FAILED.value,
            )
            .values(state=JobState.PENDING.value, next_attempt_at=now, attempts=0, updated_at=now)
        )
        await self._audit(
            conn, actor, "revocation.requeued", instance_id=instance_id, job_id=job_id
        )

    async def claim_jobs(self, *, worker: str, limit: int, claim_for: timedelta) -> list[JobView]:
        """Claim due jobs (and running ones whose claim lapsed: their worker died).
        ``SKIP LOCKED`` lets replicas claim disjoint sets; the conditional update makes a
        claim exclusive on SQLite too."""
        now = self._clock.now()
        async with self._tx() as conn:
            due = or_(
                (m.RevocationJob.state == JobState.PENDING.value)
                & (m.RevocationJob.next_attempt_at <= now),
                (m.RevocationJob.state == JobState.RUNNING.value)
                & (m.RevocationJob.claimed_until < now),
            )
            ids = (
                (
                    await conn.execute(
                        select(m.RevocationJob.job_id)
                        .where(due)
                        .order_by(m.RevocationJob.next_attempt_at)
                        .limit(limit)
                        .with_for_update(skip_locked=True)
                    )
                )
                .scalars()
                .all()
            )
            claimed = []
            for job_id in ids:
                res = await conn.execute(
                    update(m.RevocationJob)
                    .where(m.RevocationJob.job_id == job_id, due)
                    .values(
                        state=JobState.RUNNING.value,
                        claimed_by=worker[:64],
                        claimed_until=now + claim_for,
                        attempts=m.RevocationJob.attempts + 1,
                        updated_at=now,
                    )
                )
                if res.rowcount == 1:
                    claimed.append(job_id)
            if not claimed:
                return []
            rows = (
                await conn.execute(
                    select(m.RevocationJob).where(m.RevocationJob.job_id.in_(claimed))
                )
            ).all()
            return [_job_view(m.RevocationJob(**r._mapping)) for r in rows]

    async def extend_claim(self, job: JobView, *, worker: str, claim_for: timedelta) -> bool:
        """Keep a claim alive while its worker is still at the job. False if the claim is
        no longer this worker's (it lapsed and another worker took it)."""
        now = self._clock.now()
        async with self._tx() as conn:
            res = await conn.execute(
                update(m.RevocationJob)
                .where(_still_claimed(job, worker))
                .values(claimed_until=now + claim_for, updated_at=now)
            )
            return res.rowcount == 1

    async def revocation_work(self, instance_id: str) -> RevocationWork:
        async with self._tx(readonly=True) as conn:
            toks = (
                await conn.execute(
                    select(m.InstanceToken).where(m.InstanceToken.instance_id == instance_id)
                )
            ).all()
            leases = (
                await conn.execute(
                    select(m.Lease).where(
                        m.Lease.instance_id == instance_id,
                        m.Lease.state.in_(_LIVE),
                    )
                )
            ).all()
        return RevocationWork(
            tokens=tuple(TokenView(t.accessor, t.expires_at, t.revoked_at) for t in toks),
            leases=tuple(_lease_view(m.Lease(**r._mapping)) for r in leases),
        )

    async def mark_token_revoked(self, accessor: str) -> None:
        async with self._tx() as conn:
            await conn.execute(
                update(m.InstanceToken)
                .where(m.InstanceToken.accessor == accessor, m.InstanceToken.revoked_at.is_(None))
                .values(revoked_at=self._clock.now())
            )

    async def mark_leases_ended(
        self, lease_ids: Sequence[str], state: LeaseState, *, actor: str
    ) -> int:
        """Move leases to a final state, only from a state that may lead to it: a lease
        that became ``active`` meanwhile is never marked ``abandoned``. Returns how many
        rows moved; the caller compares with how many it asked for. The audit gets one
        event per instance naming exactly the leases that moved, so a lease revoked twice
        in effect would show up twice."""
        if not lease_ids:
            return 0
        sources = [old.value for old in LIVE_LEASE_STATES if lease_can_move(old, state)]
        now = self._clock.now()
        async with self._tx() as conn:
            moved: dict[str, list[str]] = {}
            for chunk_start in range(0, len(lease_ids), 500):
                chunk = list(lease_ids[chunk_start : chunk_start + 500])
                rows = await conn.execute(
                    update(m.Lease)
                    .where(m.Lease.lease_id.in_(chunk), m.Lease.state.in_(sources))
                    .values(state=state.value, ended_at=now, updated_at=now)
                    .returning(m.Lease.lease_id, m.Lease.instance_id)
                )
                for lease_id, instance_id in rows:
                    moved.setdefault(instance_id, []).append(lease_id)
            for instance_id, ids in sorted(moved.items()):
                await self._audit(
                    conn,
                    actor,
                    f"leases.{state.value}",
                    instance_id=instance_id,
                    count=len(ids),
                    lease_ids=sorted(ids)[:AUDIT_MAX_IDS],
                )
            return sum(len(ids) for ids in moved.values())

    async def finish_job(self, job: JobView, *, worker: str) -> bool:
        """Mark the job done and the instance terminated. Refuses (``LeasesStillLive``)
        while any lease of the instance is still ``issuing`` or ``active``: the instance
        row is locked first, so no request can complete a lease between check and finish."""
        now = self._clock.now()
        async with self._tx() as conn:
            await self._lock_instance(conn, job.instance_id)
            live = (
                await conn.execute(
                    select(func.count()).where(
                        m.Lease.instance_id == job.instance_id,
                        m.Lease.state.in_(_LIVE),
                    )
                )
            ).scalar_one()
            if live:
                raise LeasesStillLive(f"{live} lease(s) of the instance are still live")
            res = await conn.execute(
                update(m.RevocationJob)
                .where(_still_claimed(job, worker))
                .values(
                    state=JobState.DONE.value,
                    completed_at=now,
                    updated_at=now,
                    claimed_until=None,
                    last_error=None,
                )
            )
            if res.rowcount != 1:
                return False  # our claim lapsed and someone else holds the job now
            await conn.execute(
                update(m.Instance)
                .where(m.Instance.instance_id == job.instance_id)
                .values(state=InstanceState.TERMINATED.value, terminated_at=now, updated_at=now)
            )
            await self._audit(
                conn, worker, "instance.terminated", instance_id=job.instance_id, job_id=job.job_id
            )
            return True

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
        now = self._clock.now()
        state = JobState.FAILED if give_up else JobState.PENDING
        async with self._tx() as conn:
            res = await conn.execute(
                update(m.RevocationJob)
                .where(_still_claimed(job, worker))
                .values(
                    state=state.value,
                    attempts=m.RevocationJob.attempts - (0 if count_attempt else 1),
                    next_attempt_at=next_attempt_at,
                    last_error=error[:255],
                    claimed_until=None,
                    updated_at=now,
                )
            )
            if res.rowcount and give_up:
                await self._audit(
                    conn,
                    worker,
                    "revocation.failed",
                    instance_id=job.instance_id,
                    job_id=job.job_id,
                    error=error,
                )

    # -- reconciliation --------------------------------------------------------------

    async def past_expiry(self, *, before: datetime, limit: int) -> list[LeaseView]:
        """Leases still counted live (``active``, ``revoking``) whose expiry passed before
        ``before``: the reconciler confirms with Vault that they are gone."""
        async with self._tx(readonly=True) as conn:
            rows = (
                await conn.execute(
                    select(m.Lease)
                    .where(
                        m.Lease.state.in_([LeaseState.ACTIVE.value, LeaseState.REVOKING.value]),
                        m.Lease.expires_at < before,
                    )
                    .order_by(m.Lease.expires_at)
                    .limit(limit)
                )
            ).all()
        return [_lease_view(m.Lease(**r._mapping)) for r in rows]

    async def correct_expiry(self, lease_id: str, expires_at: datetime) -> None:
        """Vault holds the lease longer than the store thought (renewed meanwhile)."""
        async with self._tx() as conn:
            await conn.execute(
                update(m.Lease)
                .where(m.Lease.lease_id == lease_id, m.Lease.state.in_(_LIVE))
                .values(expires_at=expires_at, updated_at=self._clock.now())
            )

    async def stuck_issuing(
        self, *, created_before: datetime, limit: int
    ) -> list[tuple[LeaseView, str]]:
        """``issuing`` rows older than their request's deadline, with their instance's
        state: their request died (or gave up) before recording Vault's answer."""
        async with self._tx(readonly=True) as conn:
            rows = (
                await conn.execute(
                    select(*_L.c, _I.c.state.label("instance_state"))
                    .join(_I, _I.c.instance_id == _L.c.instance_id)
                    .where(
                        m.Lease.state == LeaseState.ISSUING.value,
                        m.Lease.created_at < created_before,
                    )
                    .order_by(m.Lease.created_at)
                    .limit(limit)
                )
            ).all()
        cols = [c.name for c in _L.c]
        return [
            (_lease_view(m.Lease(**{c: r._mapping[c] for c in cols})), r.instance_state)
            for r in rows
        ]

    async def settle_stuck(self, lease_id: str, *, revoked: Sequence[str], actor: str) -> bool:
        """An ``issuing`` row whose request is dead: ``abandoned``, with what was revoked
        for it in Vault (the leases issued for it that nobody recorded)."""
        now = self._clock.now()
        async with self._tx() as conn:
            instance_id = (
                await conn.execute(
                    update(m.Lease)
                    .where(m.Lease.lease_id == lease_id, m.Lease.state == LeaseState.ISSUING.value)
                    .values(
                        state=LeaseState.ABANDONED.value,
                        error_code="stuck_issuing",
                        ended_at=now,
                        updated_at=now,
                    )
                    .returning(m.Lease.instance_id)
                )
            ).scalar()
            if instance_id is None:
                return False
            await self._audit(
                conn,
                actor,
                "lease.stuck_settled",
                instance_id=instance_id,
                lease_id=lease_id,
                revoked_in_vault=len(revoked),
                vault_lease_ids=list(revoked)[:20],
            )
            return True

    async def vault_lease_states(self, vault_lease_ids: Sequence[str]) -> dict[str, str]:
        """For Vault lease ids, the state of the lease row that recorded each (absent: the
        store never recorded it)."""
        out: dict[str, str] = {}
        async with self._tx(readonly=True) as conn:
            for start in range(0, len(vault_lease_ids), 500):
                chunk = list(vault_lease_ids[start : start + 500])
                rows = await conn.execute(
                    select(m.Lease.vault_lease_id, m.Lease.state).where(
                        m.Lease.vault_lease_id.in_(chunk)
                    )
                )
                out.update({r[0]: r[1] for r in rows})
        return out

    async def vault_paths(self) -> set[str]:
        """Every Vault path under which Vault gave the broker a lease."""
        async with self._tx(readonly=True) as conn:
            rows = await conn.execute(
                select(m.Lease.vault_path)
                .where(m.Lease.vault_path.is_not(None), m.Lease.vault_lease_id.is_not(None))
                .distinct()
            )
            return {r[0] for r in rows}

    async def is_used(self, namespace: str, key: str) -> bool:
        async with self._tx(readonly=True) as conn:
            row = (
                await conn.execute(
                    select(m.SeenToken.jti).where(
                        m.SeenToken.issuer_name == namespace, m.SeenToken.jti == key
                    )
                )
            ).first()
        return row is not None

    async def use_once(self, namespace: str, key: str, *, keep_until: datetime) -> bool:
        """Remember ``key`` until ``keep_until``; False if it was already remembered (a
        replay). Shares the replay record of token ids, under its own namespace."""
        try:
            async with self._tx() as conn:
                await conn.execute(
                    _INSERT_SEEN, {"issuer_name": namespace, "jti": key, "expires_at": keep_until}
                )
        except IntegrityError:
            return False
        return True

    async def record_audit(self, actor: str, action: str, **detail: Any) -> None:
        async with self._tx() as conn:
            await self._audit(conn, actor, action, **detail)

    async def mark_seen(self, instance_ids: Sequence[str], at: datetime) -> None:
        """Record that these instances exchanged or renewed (batched by each replica)."""
        if not instance_ids:
            return
        async with self._tx() as conn:
            for start in range(0, len(instance_ids), 500):
                chunk = sorted(instance_ids[start : start + 500])
                await conn.execute(
                    update(m.Instance)
                    .where(
                        m.Instance.instance_id.in_(chunk),
                        or_(m.Instance.last_seen_at.is_(None), m.Instance.last_seen_at < at),
                    )
                    .values(last_seen_at=at)
                )

    async def unseen_instances(
        self, issuer_name: str, *, seen_before: datetime, limit: int
    ) -> list[str]:
        """Active instances of the issuer not seen since ``seen_before``."""
        last = func.coalesce(m.Instance.last_seen_at, m.Instance.created_at)
        async with self._tx(readonly=True) as conn:
            rows = await conn.execute(
                select(m.Instance.instance_id)
                .where(
                    m.Instance.issuer_name == issuer_name,
                    m.Instance.state == InstanceState.ACTIVE.value,
                    last < seen_before,
                )
                .order_by(last)
                .limit(limit)
            )
            return [r[0] for r in rows]

    async def retry_job(self, job_id: str, *, actor: str) -> JobView:
        """Put a ``failed`` job back in the queue, with its attempts counted from zero."""
        now = self._clock.now()
        async with self._tx() as conn:
            row = (
                await conn.execute(select(m.RevocationJob).where(m.RevocationJob.job_id == job_id))
            ).first()
            if row is None:
                raise NotFound("no such revocation job", code="job_not_found")
            if row.state != JobState.FAILED.value:
                raise BadRequest(
                    f"the job is {row.state}; only a failed job can be retried",
                    code="job_not_failed",
                )
            await self._requeue(conn, job_id, row.instance_id, actor, now)
            row = (
                await conn.execute(select(m.RevocationJob).where(m.RevocationJob.job_id == job_id))
            ).one()
            return _job_view(m.RevocationJob(**row._mapping))

    async def active_instance_ids(self, issuer_name: str) -> set[str]:
        """Ids of the issuer's instances that are still active (for a source that relists
        what exists and terminates what the broker knows but the source no longer has)."""
        async with self._tx(readonly=True) as conn:
            rows = await conn.execute(
                select(m.Instance.instance_id).where(
                    m.Instance.issuer_name == issuer_name,
                    m.Instance.state == InstanceState.ACTIVE.value,
                )
            )
            return {r[0] for r in rows}

    # -- admin queries ---------------------------------------------------------------

    async def get_instance(
        self, instance_id: str
    ) -> tuple[InstanceView, list[LeaseView], JobView | None]:
        """The instance, its leases and its job, read job first: each statement sees what
        was committed when it ran, and a job marked done commits with its instance's
        ``terminated`` and after its leases' final states, so a done job is never shown
        beside a ``terminating`` instance or a live lease."""
        async with self._tx(readonly=True) as conn:
            job = (
                await conn.execute(
                    select(m.RevocationJob).where(m.RevocationJob.instance_id == instance_id)
                )
            ).first()
            leases = (
                await conn.execute(
                    select(m.Lease)
                    .where(m.Lease.instance_id == instance_id)
                    .order_by(m.Lease.created_at)
                )
            ).all()
            row = (
                await conn.execute(select(m.Instance).where(m.Instance.instance_id == instance_id))
            ).first()
            if row is None:
                raise NotFound("no such instance", code="instance_not_found")
        return (
            _instance_view(m.Instance(**row._mapping)),
            [_lease_view(m.Lease(**r._mapping)) for r in leases],
            _job_view(m.RevocationJob(**job._mapping)) if job else None,
        )

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
        stmt = select(m.Lease)
        for col, value in (
            (m.Lease.instance_id, instance),
            (m.Lease.workload, workload),
            (m.Lease.role, role),
            (m.Lease.state, state),
        ):
            if value is not None:
                stmt = stmt.where(col == value)
        if after is not None:
            stmt = stmt.where(m.Lease.lease_id > after)
        stmt = stmt.order_by(m.Lease.lease_id).limit(limit)
        async with self._tx(readonly=True) as conn:
            rows = (await conn.execute(stmt)).all()
        return [_lease_view(m.Lease(**r._mapping)) for r in rows]

    async def list_jobs(self, *, state: str | None = None, limit: int = 100) -> list[JobView]:
        stmt = select(m.RevocationJob)
        if state is not None:
            stmt = stmt.where(m.RevocationJob.state == state)
        stmt = stmt.order_by(m.RevocationJob.created_at).limit(limit)
        async with self._tx(readonly=True) as conn:
            rows = (await conn.execute(stmt)).all()
        return [_job_view(m.RevocationJob(**r._mapping)) for r in rows]

    async def audit_events(self, instance_id: str) -> list[dict[str, Any]]:
        async with self._tx(readonly=True) as conn:
            rows = (
                await conn.execute(
                    select(m.AuditEvent)
                    .where(m.AuditEvent.instance_id == instance_id)
                    .order_by(m.AuditEvent.id)
                )
            ).all()
        return [
            {
                "at": _iso(r.at),
                "actor": r.actor,
                "action": r.action,
                "lease_id": r.lease_id,
                "detail": r.detail,
            }
            for r in rows
        ]

    async def prune_seen_tokens(self, *, grace: timedelta) -> int:
        """Forget token ids whose tokens expired (plus the leeway): they can no longer be
        presented, so their replay record has done its work."""
        async with self._tx() as conn:
            res = await conn.execute(
                m.SeenToken.__table__.delete().where(
                    m.SeenToken.expires_at < self._clock.now() - grace
                )
            )
            return int(res.rowcount or 0)

    async def counts(self) -> StoreCounts:
        now = self._clock.now()
        async with self._tx(readonly=True) as conn:
            lease_rows = (
                await conn.execute(
                    select(m.Lease.role, m.Lease.state, func.count())
                    .where(m.Lease.state.in_(_LIVE))
                    .group_by(m.Lease.role, m.Lease.state)
                )
            ).all()
            queue = (
                await conn.execute(
                    select(func.count(), func.min(m.RevocationJob.created_at)).where(
                        m.RevocationJob.state.in_([JobState.PENDING.value, JobState.RUNNING.value])
                    )
                )
            ).one()
            failed = (
                await conn.execute(
                    select(func.count()).where(m.RevocationJob.state == JobState.FAILED.value)
                )
            ).scalar_one()
        oldest = queue[1]
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        return StoreCounts(
            leases={(r[0], r[1]): int(r[2]) for r in lease_rows},
            queue_depth=int(queue[0]),
            oldest_job_age_s=(now - oldest).total_seconds() if oldest else 0.0,
            failed_jobs=int(failed),
        )


def _sqlite_pragmas(engine: AsyncEngine) -> None:
    """WAL for concurrent readers, FULL sync so a recorded lease survives a crash, and
    ``BEGIN IMMEDIATE`` so a transaction takes the write lock up front instead of failing
    on upgrade."""

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_conn: Any, _: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        readonly = conn.get_execution_options().get("broker_readonly", False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")
