"""Issuance's SQL: the ``issuing`` row before Vault is asked, its completion or failure,
the instance-token accessors, and the lease operations of the lease's own workload."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.clock import Clock
from broker.errors import (
    InstanceTerminated,
    LeaseLimitReached,
    NotFound,
    StoreUnavailable,
)
from broker.leases import models as m
from broker.leases.locks import LockSubject, refusing_lock
from broker.leases.sql.common import (
    LEASES,
    SEEN_TOKENS,
    TOKENS,
    WHICH_INSTANCE,
    audit,
    ensure_instance,
    iso,
    lease_view,
    lock_instance,
    require_owner,
    use_token_once,
)
from broker.leases.sql.locks import active_locks, refuse_if_locked
from broker.leases.states import (
    COUNTED_LEASE_STATES,
    LIVE_LEASE_STATES,
    InstanceState,
    LeaseState,
    lease_can_move,
)
from broker.leases.views import LeaseLimit, LeaseView

_INSERT_LEASE = LEASES.insert()
_INSERT_TOKEN = TOKENS.insert()
_COUNTED_FOR_LIMIT = (
    select(LEASES.c.lease_id, LEASES.c.vault_lease_id, LEASES.c.state)
    .where(
        LEASES.c.instance_id == bindparam("b_iid"),
        LEASES.c.role == bindparam("b_role"),
        LEASES.c.state.in_(sorted(s.value for s in COUNTED_LEASE_STATES)),
        # A credential past its expiry is gone in Vault already: it holds no slot (its row
        # stays active so that termination still settles it).
        or_(LEASES.c.expires_at.is_(None), LEASES.c.expires_at > bindparam("b_now")),
    )
    .order_by(LEASES.c.created_at, LEASES.c.lease_id)
)
_REPLACED_PENDING = select(func.count()).where(
    LEASES.c.instance_id == bindparam("b_iid"),
    LEASES.c.role == bindparam("b_role"),
    LEASES.c.state == LeaseState.REVOKING.value,
)
_COMPLETE_LEASE = (
    update(LEASES)
    .where(
        LEASES.c.lease_id == bindparam("b_lid"),
        LEASES.c.state == LeaseState.ISSUING.value,
        # Past the issuing bound the reconciler may take the row's lease for unrecorded
        # and revoke it: a request that slow records nothing and takes its lease back.
        LEASES.c.created_at > bindparam("b_stale"),
    )
    .values(
        state=bindparam("b_state"),
        vault_lease_id=bindparam("b_vlid"),
        token_accessor=bindparam("b_acc"),
        renewable=bindparam("b_ren"),
        issued_at=bindparam("b_iss"),
        expires_at=bindparam("b_exp"),
        updated_at=bindparam("b_now"),
        credential_ref=bindparam("b_ref"),
    )
    .returning(LEASES.c.instance_id, LEASES.c.workload, LEASES.c.role, LEASES.c.kind)
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def begin_issue(
    conn: AsyncConnection,
    clock: Clock,
    lease_id: str,
    *,
    instance_id: str,
    issuer_name: str,
    workload: str,
    role: str,
    kind: str,
    token_id: tuple[str, datetime] | None,
    limit: LeaseLimit | None,
    external_ref: dict[str, Any] | None,
    vault_path: str | None,
    lock_subject: LockSubject | None = None,
    claims: dict[str, Any] | None = None,
) -> list[tuple[str, str]]:
    """Write the ``issuing`` row; the leases it supersedes under ``limit``. A request an
    active lock matches is refused first (``Locked``), in this same transaction."""
    superseded: list[tuple[str, str]] = []
    if lock_subject is not None:
        await refuse_if_locked(conn, lock_subject, clock.now())
    state, owner, owner_workload = await ensure_instance(
        conn,
        clock,
        instance_id,
        issuer_name,
        workload,
        InstanceState.ACTIVE,
        shared=limit is None,
        claims=claims,
    )
    require_owner(instance_id, owner, owner_workload, issuer=issuer_name, workload=workload)
    if state != InstanceState.ACTIVE:
        raise InstanceTerminated(
            f"instance {instance_id} is terminated; no new credential is issued for it"
        )
    if token_id is not None:
        await use_token_once(
            conn,
            issuer_name,
            token_id,
            "this token was already used for an exchange; get a fresh token",
        )
    now = clock.now()
    if limit is not None:
        superseded = await _make_room(conn, clock, instance_id, role, limit, now)
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
    return superseded


async def _make_room(
    conn: AsyncConnection,
    clock: Clock,
    instance_id: str,
    role: str,
    limit: LeaseLimit,
    now: datetime,
) -> list[tuple[str, str]]:
    """Under the instance's exclusive lock: refuse, or pick the oldest active leases
    to replace, so that with the new one the role stays within its limit."""
    live = (
        await conn.execute(_COUNTED_FOR_LIMIT, {"b_iid": instance_id, "b_role": role, "b_now": now})
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
    await audit(
        conn,
        clock,
        "lease_limit",
        "leases.superseded",
        instance_id=instance_id,
        role=role,
        lease_ids=[v[0] for v in victims],
    )
    return victims


async def record_token(
    conn: AsyncConnection, clock: Clock, *, instance_id: str, accessor: str, expires_at: datetime
) -> None:
    current = await lock_instance(conn, instance_id, shared=True)
    if current is None or current[0] != InstanceState.ACTIVE:
        raise InstanceTerminated(f"instance {instance_id} is terminated")
    await conn.execute(
        _INSERT_TOKEN,
        {
            "accessor": accessor,
            "instance_id": instance_id,
            "created_at": clock.now(),
            "expires_at": expires_at,
        },
    )
    # The accessor is not named: like Vault's audit devices, the audit does not hold one.
    await audit(
        conn,
        clock,
        "broker",
        "instance.token_created",
        instance_id=instance_id,
        expires_at=iso(expires_at),
    )


async def complete_issue(
    conn: AsyncConnection,
    clock: Clock,
    lease_id: str,
    *,
    vault_lease_id: str | None,
    accessor: str,
    renewable: bool,
    issued_at: datetime,
    expires_at: datetime,
    state: LeaseState,
    created_after: datetime | None,
    engine: str | None = None,
    token_ref: str | None = None,
    lock_subject: LockSubject | None = None,
    credential_ref: dict[str, str] | None = None,
) -> bool:
    """Complete the ``issuing`` row; whether the instance is still active. A lock that
    matches ``lock_subject`` now (created while Vault was asked) refuses it (``Locked``):
    nothing is written, and the caller takes the credential back."""
    if lock_subject is not None:
        await refuse_if_locked(conn, lock_subject, clock.now())
    row = (
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
                "b_now": clock.now(),
                "b_stale": created_after or EPOCH,
                "b_ref": credential_ref,
            },
        )
    ).first()
    if row is None:
        raise StoreUnavailable(
            "the credential could not be recorded in time (or its row changed); "
            "it was taken back: retry",
            code="lease_state_conflict",
        )
    instance_id, workload, role, kind = row
    # Under the shared lock: termination (exclusive) either committed before, and we
    # see it, or waits for this transaction, and its job then sees the active row.
    current = await lock_instance(conn, instance_id, shared=True)
    active = current is not None and current[0] == InstanceState.ACTIVE.value
    subject: dict[str, Any] = {"issuer": current[1] if current else None, "workload": workload}
    if token_ref is not None:
        subject["token"] = token_ref
    await audit(
        conn,
        clock,
        "workload",
        "lease.issued",
        instance_id=instance_id,
        lease_id=lease_id,
        # Recorded, and revoked by the instance's job: the credential is not handed out.
        outcome="ok" if active else "withheld",
        reason=None if active else "instance terminated while the credential was issued",
        **subject,
        role=role,
        kind=kind,
        engine=engine,
        state=state.value,
        vault_lease_id=vault_lease_id,
        credential_ref=credential_ref,
        renewable=renewable,
        expires_at=iso(expires_at),
    )
    return active


async def fail_issue(
    conn: AsyncConnection,
    clock: Clock,
    lease_id: str,
    code: str,
    *,
    release_token_id: tuple[str, str] | None,
) -> None:
    if release_token_id is not None:
        await conn.execute(
            SEEN_TOKENS.delete().where(
                m.SeenToken.issuer_name == release_token_id[0],
                m.SeenToken.jti == release_token_id[1],
            )
        )
    row = (
        await conn.execute(
            update(m.Lease)
            .where(m.Lease.lease_id == lease_id, m.Lease.state == LeaseState.ISSUING.value)
            .values(
                state=LeaseState.FAILED.value,
                error_code=code[:64],
                updated_at=clock.now(),
                ended_at=clock.now(),
            )
            .returning(m.Lease.instance_id, m.Lease.workload, m.Lease.role)
        )
    ).first()
    if row is not None:
        await audit(
            conn,
            clock,
            "workload",
            "lease.failed",
            instance_id=row[0],
            lease_id=lease_id,
            outcome="failed",
            reason=code[:64],
            workload=row[1],
            role=row[2],
            token_given_back=release_token_id is not None,
        )


async def get_lease(conn: AsyncConnection, lease_id: str) -> LeaseView:
    row = (await conn.execute(select(m.Lease).where(m.Lease.lease_id == lease_id))).first()
    if row is None:
        raise NotFound("no such lease", code="lease_not_found")
    return lease_view(m.Lease(**row._mapping))


async def instance_state(conn: AsyncConnection, instance_id: str) -> tuple[str, str | None] | None:
    row = (await conn.execute(WHICH_INSTANCE, {"b_iid": instance_id})).first()
    return (row[0], row[1]) if row else None


async def set_lease_expiry(
    conn: AsyncConnection,
    clock: Clock,
    lease_id: str,
    expires_at: datetime,
    renewable: bool,
    lock_subject: LockSubject | None = None,
) -> str | None:
    """Record a renewal Vault made. The expiry is recorded whatever happens (it is what
    Vault holds); if a lock matching ``lock_subject`` appeared while Vault was asked, the
    event says the renewal was withheld and its lock id is returned (the caller refuses)."""
    now = clock.now()
    locked = (
        refusing_lock(await active_locks(conn, now), lock_subject, now)
        if lock_subject is not None
        else None
    )
    row = (
        await conn.execute(
            update(m.Lease)
            .where(m.Lease.lease_id == lease_id)
            .values(expires_at=expires_at, renewable=renewable, updated_at=clock.now())
            .returning(m.Lease.instance_id, m.Lease.workload, m.Lease.role, m.Lease.vault_lease_id)
        )
    ).one()
    await audit(
        conn,
        clock,
        "workload",
        "lease.renewed",
        instance_id=row[0],
        lease_id=lease_id,
        outcome="ok" if locked is None else "withheld",
        reason=None if locked is None else f"lock {locked.lock_id} created while renewing",
        workload=row[1],
        role=row[2],
        vault_lease_id=row[3],
        renewable=renewable,
        expires_at=iso(expires_at),
    )
    return None if locked is None else locked.lock_id


async def end_lease(
    conn: AsyncConnection, clock: Clock, lease_id: str, state: LeaseState, actor: str
) -> bool:
    now = clock.now()
    row = (
        await conn.execute(
            update(m.Lease)
            .where(
                m.Lease.lease_id == lease_id,
                m.Lease.state.in_([o.value for o in LIVE_LEASE_STATES if lease_can_move(o, state)]),
            )
            .values(state=state.value, ended_at=now, updated_at=now)
            .returning(m.Lease.instance_id, m.Lease.workload, m.Lease.role, m.Lease.vault_lease_id)
        )
    ).first()
    if row is not None:
        await audit(
            conn,
            clock,
            actor,
            f"lease.{state.value}",
            instance_id=row[0],
            lease_id=lease_id,
            workload=row[1],
            role=row[2],
            vault_lease_id=row[3],
        )
    return row is not None
