"""The admin API's SQL: an instance with its leases and job, listings, the audit trail,
and the counts behind the metrics."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.errors import NotFound
from broker.leases import models as m
from broker.leases.sql.common import LIVE, instance_view, job_view, lease_view
from broker.leases.states import JobState
from broker.leases.views import InstanceView, JobView, LeaseView, StoreCounts


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


async def list_jobs(conn: AsyncConnection, *, state: str | None, limit: int) -> list[JobView]:
    stmt = select(m.RevocationJob)
    if state is not None:
        stmt = stmt.where(m.RevocationJob.state == state)
    stmt = stmt.order_by(m.RevocationJob.created_at).limit(limit)
    rows = (await conn.execute(stmt)).all()
    return [job_view(m.RevocationJob(**r._mapping)) for r in rows]


async def counts(conn: AsyncConnection, now: datetime) -> StoreCounts:
    lease_rows = (
        await conn.execute(
            select(m.Lease.role, m.Lease.state, func.count())
            .where(m.Lease.state.in_(LIVE))
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
