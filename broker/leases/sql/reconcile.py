"""The reconciler's SQL: leases past their expiry, ``issuing`` rows whose request died,
what the store knows of Vault's leases; and instance sightings, which instances went unseen
and which are active."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

from sqlalchemy import BindParameter, and_, bindparam, func, or_, select, union_all, update
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.clock import Clock, iso_z
from broker.leases import models as m
from broker.leases.sql.common import INSTANCES, LEASES, LIVE, audit, lease_view
from broker.leases.states import InstanceState, LeaseState
from broker.leases.views import LeaseView


def _written_out(value: Any, *, expanding: bool = False) -> BindParameter[Any]:
    """A value the statement carries as a literal, not a parameter: a partial index's
    predicate (``broker.leases.models``) is proved from the query's own text, which a
    PostgreSQL plan made for any parameter value (a prepared statement's generic plan)
    cannot do."""
    return bindparam(None, value, expanding=expanding, literal_execute=True)


# The states of ``ix_leases_unsent_live_path``'s predicate.
_UNSENT_LIVE = [LeaseState.ACTIVE.value, LeaseState.REVOKING.value]


async def past_expiry(conn: AsyncConnection, *, before: datetime, limit: int) -> list[LeaseView]:
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
    return [lease_view(m.Lease(**r._mapping)) for r in rows]


async def correct_expiry(
    conn: AsyncConnection, clock: Clock, lease_id: str, expires_at: datetime
) -> None:
    instance_id = (
        await conn.execute(
            update(m.Lease)
            .where(m.Lease.lease_id == lease_id, m.Lease.state.in_(LIVE))
            .values(expires_at=expires_at, updated_at=clock.now())
            .returning(m.Lease.instance_id)
        )
    ).scalar()
    if instance_id is not None:
        await audit(
            conn,
            clock,
            "reconciler",
            "lease.expiry_corrected",
            instance_id=instance_id,
            lease_id=lease_id,
            expires_at=iso_z(expires_at),
        )


async def stuck_issuing(
    conn: AsyncConnection, *, created_before: datetime, limit: int
) -> list[tuple[LeaseView, str]]:
    rows = (
        await conn.execute(
            select(*LEASES.c, INSTANCES.c.state.label("instance_state"))
            .join(INSTANCES, INSTANCES.c.instance_id == LEASES.c.instance_id)
            .where(
                m.Lease.state == LeaseState.ISSUING.value,
                m.Lease.created_at < created_before,
            )
            .order_by(m.Lease.created_at)
            .limit(limit)
        )
    ).all()
    cols = [c.name for c in LEASES.c]
    return [
        (lease_view(m.Lease(**{c: r._mapping[c] for c in cols})), r.instance_state) for r in rows
    ]


async def settle_stuck(
    conn: AsyncConnection, clock: Clock, lease_id: str, *, revoked: Sequence[str], actor: str
) -> bool:
    now = clock.now()
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
    await audit(
        conn,
        clock,
        actor,
        "lease.stuck_settled",
        instance_id=instance_id,
        lease_id=lease_id,
        revoked_in_vault=len(revoked),
        vault_lease_ids=list(revoked)[:20],
    )
    return True


async def vault_lease_states(
    conn: AsyncConnection, vault_lease_ids: Sequence[str]
) -> dict[str, str]:
    out: dict[str, str] = {}
    for start in range(0, len(vault_lease_ids), 500):
        chunk = list(vault_lease_ids[start : start + 500])
        rows = await conn.execute(
            select(m.Lease.vault_lease_id, m.Lease.state).where(m.Lease.vault_lease_id.in_(chunk))
        )
        out.update({r[0]: r[1] for r in rows if r[0] is not None})
    return out


async def vault_paths(conn: AsyncConnection) -> set[str]:
    """The distinct ``vault_path`` of leases Vault gave, as a loose index scan: the least
    path, then the least one after it, and so on (one probe of ``ix_leases_vault_path``
    per path), where ``SELECT DISTINCT`` would read every lease ever given."""
    given = m.Lease.vault_lease_id.is_not(None)
    paths = select(func.min(m.Lease.vault_path).label("path")).where(given).cte(
        "paths", recursive=True
    )
    following = (
        select(func.min(m.Lease.vault_path))
        .where(given, m.Lease.vault_path > paths.c.path)
        .scalar_subquery()
    )
    paths = paths.union_all(select(following).where(paths.c.path.is_not(None)))
    rows = await conn.execute(select(paths.c.path).where(paths.c.path.is_not(None)))
    return {r[0] for r in rows}


async def unseen_instances(
    conn: AsyncConnection, issuer_name: str, *, seen_before: datetime, limit: int
) -> list[str]:
    last = func.coalesce(m.Instance.last_seen_at, m.Instance.created_at)
    rows = await conn.execute(
        select(m.Instance.instance_id)
        .where(
            m.Instance.issuer_name == issuer_name,
            m.Instance.state == _written_out(InstanceState.ACTIVE.value),
            last < seen_before,
        )
        .order_by(last)
        .limit(limit)
    )
    return [r[0] for r in rows]


async def active_instance_ids(conn: AsyncConnection, issuer_name: str) -> set[str]:
    rows = await conn.execute(
        select(m.Instance.instance_id).where(
            m.Instance.issuer_name == issuer_name,
            m.Instance.state == InstanceState.ACTIVE.value,
        )
    )
    return {r[0] for r in rows}


async def mark_seen(conn: AsyncConnection, instance_ids: Sequence[str], at: datetime) -> None:
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


# ``!`` escapes LIKE's wildcards in a Vault path (``_`` and ``%`` are common in role names).
_LIKE_ESCAPE = "!"


def like_prefix(path: str) -> str:
    """A LIKE pattern matching what starts with ``path/``, the path taken literally."""
    for char in (_LIKE_ESCAPE, "%", "_"):
        path = path.replace(char, _LIKE_ESCAPE + char)
    return f"{path}/%"


def stored_forms(path: str) -> list[str]:
    """How a lease row may store the Vault path ``path`` (as Vault names it) in
    ``vault_path``: escaped segment by segment, as ``broker.vault.paths.vault_path`` builds
    a request's path, or as it is (the same unless a segment holds ``@``, ``:``, ``%``)."""
    escaped = "/".join(quote(seg, safe="") for seg in path.split("/"))
    return sorted({escaped, path})


async def unsent_live_under(
    conn: AsyncConnection,
    path: str,
    *,
    expiring_after: datetime,
    after: tuple[datetime, str] | None,
    limit: int,
) -> tuple[list[LeaseView], tuple[datetime, str] | None]:
    """Live leases Vault named directly under ``path`` (``path/<id>``), with no revocation
    of ours sent and an expiry after ``expiring_after``: Vault's listing of ``path`` must
    show each of them. One page of at most ``limit`` rows, by (created_at, lease_id), from
    after the cursor ``after``; with the cursor of its last row, or None at the end.

    Vault names a lease after the path it was asked at, which the row recorded as its
    ``vault_path`` when it began: a lease directly under ``path`` has ``path`` as its
    ``vault_path`` (``stored_forms``), or none if it began before the store recorded one
    (migration 0004). Each of these is read on its own, in page order from
    ``ix_leases_unsent_live_path``, and the pages merged: a page reads a page of rows per
    form (and the rows left with no ``vault_path`` that are under other paths), never every
    live lease. The Vault lease id still decides what is under ``path``."""
    where = [
        m.Lease.state.in_(_written_out(_UNSENT_LIVE, expanding=True)),
        m.Lease.vault_lease_id.like(like_prefix(path), escape=_LIKE_ESCAPE),
        m.Lease.revoke_sent_at.is_(None),
        m.Lease.expires_at > expiring_after,
    ]
    if after is not None:
        created, lease_id = after
        where.append(
            or_(
                m.Lease.created_at > created,
                and_(m.Lease.created_at == created, m.Lease.lease_id > lease_id),
            )
        )
        where.append(m.Lease.created_at >= created)  # the same rows, as an index condition
    recorded = [m.Lease.vault_path == form for form in stored_forms(path)]
    pages = [
        select(m.Lease)
        .where(in_path, *where)
        .order_by(m.Lease.created_at, m.Lease.lease_id)
        .limit(limit)
        .subquery()
        for in_path in [*recorded, m.Lease.vault_path.is_(None)]
    ]
    merged = union_all(*(select(page) for page in pages)).subquery()
    rows = (
        await conn.execute(
            select(merged).order_by(merged.c.created_at, merged.c.lease_id).limit(limit)
        )
    ).all()
    views = [lease_view(m.Lease(**r._mapping)) for r in rows]
    cursor = (views[-1].created_at, views[-1].lease_id) if len(views) == limit else None
    root = f"{path}/"
    return [
        v
        for v in views
        if v.vault_lease_id is not None
        and v.vault_lease_id.startswith(root)
        and "/" not in v.vault_lease_id[len(root) :]
    ], cursor
