"""The admin API's SQL: an instance with its leases and job, listings, the audit trail,
and the counts behind the metrics."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.errors import NotFound
from broker.leases import models as m
from broker.leases.sql.common import LIVE, instance_view, job_view, lease_view
from broker.leases.states import JobState, LeaseState
from broker.leases.views import (
    InstanceListing,
    InstanceView,
    JobView,
    LeaseGroups,
    LeaseView,
    StoreCounts,
)

# What ``leases count`` groups by: the engine is the lease's kind (its role's engine), the
# issuer is its instance's.
LEASE_GROUPS: dict[str, Any] = {
    "role": m.Lease.role,
    "engine": m.Lease.kind,
    "workload": m.Lease.workload,
    "issuer": m.Instance.issuer_name,
}
# A listing's position: the (created_at, id) of the last row of the page before.
Cursor = tuple[datetime, str]


def _after(created_at: Any, key: Any, after: Cursor | None) -> Any:
    if after is None:
        return None
    at, last = after
    return or_(created_at > at, and_(created_at == at, key > last))


async def get_instance(
    conn: AsyncConnection, instance_id: str
) -> tuple[InstanceView, list[LeaseView], JobView | None]:
    job = (
        await conn.execute(
            select(m.RevocationJob).where(m.RevocationJob.instance_id == instance_id)
        )
    ).first()
    leases = (
        await conn.execute(
            select(m.Lease).where(m.Lease.instance_id == instance_id).order_by(m.Lease.created_at)
        )
    ).all()
    row = (
        await conn.execute(select(m.Instance).where(m.Instance.instance_id == instance_id))
    ).first()
    if row is None:
        raise NotFound("no such instance", code="instance_not_found")
    return (
        instance_view(m.Instance(**row._mapping)),
        [lease_view(m.Lease(**r._mapping)) for r in leases],
        job_view(m.RevocationJob(**job._mapping)) if job else None,
    )


async def list_leases(
    conn: AsyncConnection,
    *,
    instance: str | None,
    workload: str | None,
    role: str | None,
    state: str | None,
    limit: int,
    after: str | None,
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
    rows = (await conn.execute(stmt)).all()
    return [lease_view(m.Lease(**r._mapping)) for r in rows]


async def list_jobs(
    conn: AsyncConnection,
    *,
    state: str | None,
    limit: int,
    instance: str | None = None,
    since: datetime | None = None,
    after: Cursor | None = None,
) -> list[JobView]:
    """Jobs in the order they were requested (``created_at``, then ``job_id``), from
    ``after`` on (``ix_jobs_created``)."""
    job = m.RevocationJob
    stmt = select(job)
    for col, value in ((job.state, state), (job.instance_id, instance)):
        if value is not None:
            stmt = stmt.where(col == value)
    if since is not None:
        stmt = stmt.where(job.created_at >= since)
    if (position := _after(job.created_at, job.job_id, after)) is not None:
        stmt = stmt.where(position)
    stmt = stmt.order_by(job.created_at, job.job_id).limit(limit)
    rows = (await conn.execute(stmt)).all()
    return [job_view(m.RevocationJob(**r._mapping)) for r in rows]


async def list_instances(
    conn: AsyncConnection,
    *,
    state: str | None,
    workload: str | None,
    issuer: str | None,
    since: datetime | None,
    limit: int,
    after: Cursor | None,
) -> list[InstanceListing]:
    """Instances in the order the broker first saw them, each with its lease count by
    state (one grouped query over the page's instances, ``ix_leases_instance_state``)."""
    inst = m.Instance
    stmt = select(inst)
    for col, value in ((inst.state, state), (inst.workload, workload), (inst.issuer_name, issuer)):
        if value is not None:
            stmt = stmt.where(col == value)
    if since is not None:
        stmt = stmt.where(inst.created_at >= since)
    if (position := _after(inst.created_at, inst.instance_id, after)) is not None:
        stmt = stmt.where(position)
    stmt = stmt.order_by(inst.created_at, inst.instance_id).limit(limit)
    instances = [instance_view(m.Instance(**r._mapping)) for r in (await conn.execute(stmt))]
    counts: dict[str, dict[str, int]] = {i.instance_id: {} for i in instances}
    if instances:
        rows = await conn.execute(
            select(m.Lease.instance_id, m.Lease.state, func.count())
            .where(m.Lease.instance_id.in_(list(counts)))
            .group_by(m.Lease.instance_id, m.Lease.state)
        )
        for instance_id, lease_state, n in rows:
            counts[instance_id][lease_state] = int(n)
    return [InstanceListing(i, counts[i.instance_id]) for i in instances]


async def count_leases(
    conn: AsyncConnection, *, group_by: str, states: Sequence[str], top: int
) -> LeaseGroups:
    """Leases in ``states`` counted by ``group_by`` (a key of ``LEASE_GROUPS``), largest
    first, in one grouped query: the state filter runs on ``ix_leases_state_created``, and
    window functions over the groups give the total and the number of groups."""
    key = LEASE_GROUPS[group_by]
    n = func.count()
    stmt = select(key, n, func.sum(n).over(), func.count().over()).select_from(m.Lease)
    if group_by == "issuer":
        stmt = stmt.join(m.Instance, m.Instance.instance_id == m.Lease.instance_id)
    stmt = (
        stmt.where(m.Lease.state.in_(list(states)))
        .group_by(key)
        .order_by(n.desc(), key)
        .limit(top)
    )
    rows = (await conn.execute(stmt)).all()
    return LeaseGroups(
        group_by=group_by,
        groups=tuple((r[0], int(r[1])) for r in rows),
        total=int(rows[0][2]) if rows else 0,
        group_count=int(rows[0][3]) if rows else 0,
    )


async def instance_standing(
    conn: AsyncConnection, instance_id: str
) -> tuple[InstanceView, JobView | None] | None:
    """An instance and its revocation job, without its leases (``policy explain``); None
    for an instance the broker never saw."""
    row = (
        await conn.execute(select(m.Instance).where(m.Instance.instance_id == instance_id))
    ).first()
    if row is None:
        return None
    job = (
        await conn.execute(
            select(m.RevocationJob).where(m.RevocationJob.instance_id == instance_id)
        )
    ).first()
    return (
        instance_view(m.Instance(**row._mapping)),
        job_view(m.RevocationJob(**job._mapping)) if job else None,
    )


async def counts(conn: AsyncConnection, now: datetime) -> StoreCounts:
    lease_rows = (
        await conn.execute(
            select(m.Lease.role, m.Lease.state, func.count())
            # Lost ones too: each is a credential that may still work until ended by hand.
            .where(m.Lease.state.in_([*LIVE, LeaseState.LOST.value]))
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
