"""A selection's SQL (``broker.leases.selection``): its blast radius as aggregates, and
one bounded batch of its termination through the termination SQL of
``broker.leases.sql.jobs`` (its set-based form for the batch, the per-instance one for
never-seen ids). Every query filters on indexed columns (instance id, state,
workload, issuer; a lease's instance and state, role); only a claim selector reads the
JSON of the instances the other selectors leave."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import (
    Text,
    and_,
    case,
    cast,
    distinct,
    exists,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.clock import Clock
from broker.leases.selection import (
    BlastRadius,
    Progress,
    Selection,
    Terminated,
    TerminationBatch,
)
from broker.leases.sql.common import INSTANCES, JOBS, LEASES, LIVE
from broker.leases.sql.jobs import request_termination, request_terminations, requeue_failed
from broker.leases.states import InstanceState, JobState, LeaseState

_ACTIVE = InstanceState.ACTIVE.value
# Their columns, for short.
Ic, Lc, Jc = INSTANCES.c, LEASES.c, JOBS.c


def _claim(dialect: str, key: str, value: str) -> Any:
    """The instance's recorded claim ``key`` is the string ``value`` or a list holding it."""
    if dialect == "postgresql":
        # jsonb containment: '"v"' @> '"v"' and '["a","v"]' @> '"v"' both hold.
        return cast(Ic.claims, JSONB)[key].contains(cast(func.to_jsonb(cast(value, Text)), JSONB))
    # SQLite: json_each over a string yields the string, over a list its elements. The key
    # is quoted in the path ('$."k"'); keys with '"' are refused when the selection is read.
    each = func.json_each(Ic.claims, f'$."{key}"').table_valued("value", "type")
    return exists(
        select(literal(1)).select_from(each).where(each.c.type == "text", each.c.value == value)
    )


def _lease_match(selection: Selection, *, live: bool) -> Any:
    conds: list[Any] = [Lc.instance_id == Ic.instance_id]
    if selection.roles:
        conds.append(Lc.role.in_(selection.roles))
    if selection.leases:
        conds.append(Lc.lease_id.in_(selection.leases))
    if selection.issued_after is not None:
        conds.append(Lc.created_at >= selection.issued_after)
    if selection.issued_before is not None:
        conds.append(Lc.created_at < selection.issued_before)
    if live:
        conds.append(Lc.state.in_(LIVE))
    return exists(select(literal(1)).select_from(LEASES).where(*conds))


def selected(selection: Selection, dialect: str) -> Any:
    """The WHERE clause over ``instances`` of the selection (AND of its selectors)."""
    if selection.empty:
        raise ValueError("an empty selection selects nothing; the caller refuses it")
    conds: list[Any] = []
    if selection.instances:
        conds.append(Ic.instance_id.in_(selection.instances))
    if selection.workloads:
        conds.append(Ic.workload.in_(selection.workloads))
    if selection.issuers:
        conds.append(Ic.issuer_name.in_(selection.issuers))
    for key, values in selection.claims_by_key().items():
        conds.append(or_(*(_claim(dialect, key, v) for v in values)))
    if selection.lease_level:
        conds.append(
            or_(
                and_(Ic.state == _ACTIVE, _lease_match(selection, live=True)),
                and_(Ic.state != _ACTIVE, _lease_match(selection, live=False)),
            )
        )
    return and_(*conds)


async def never_seen(conn: AsyncConnection, instance_ids: Sequence[str]) -> list[str]:
    """Of these ids, those the broker never saw: no row, or only the tombstone a
    termination wrote (never seen exchanging, no lease ever)."""
    if not instance_ids:
        return []
    any_lease = exists(
        select(literal(1)).select_from(LEASES).where(Lc.instance_id == Ic.instance_id)
    )
    seen = set(
        (
            await conn.execute(
                select(Ic.instance_id).where(
                    Ic.instance_id.in_(instance_ids), or_(Ic.last_seen_at.is_not(None), any_lease)
                )
            )
        ).scalars()
    )
    return [i for i in dict.fromkeys(instance_ids) if i not in seen]


async def _progress(conn: AsyncConnection, where: Any) -> Progress:
    of_selection = select(Ic.instance_id).where(where)
    jobs = (
        await conn.execute(
            select(Jc.state, func.count())
            .where(Jc.instance_id.in_(of_selection))
            .group_by(Jc.state)
        )
    ).all()
    is_live = case(
        (Lc.state.in_(LIVE), "live"), (Lc.state == LeaseState.LOST.value, "lost"), else_="ended"
    )
    leases: dict[str, int] = dict(
        (
            await conn.execute(
                select(is_live, func.count())
                .select_from(LEASES.join(JOBS, Jc.instance_id == Lc.instance_id))
                .where(
                    Lc.instance_id.in_(of_selection),
                    or_(Lc.state.in_(LIVE), Lc.ended_at >= Jc.created_at),
                )
                .group_by(is_live)
            )
        ).all()
    )
    return Progress(
        jobs={str(s): int(n) for s, n in jobs},
        leases_live=int(leases.get("live", 0)),
        leases_ended=int(leases.get("ended", 0)) + int(leases.get("lost", 0)),
        leases_lost=int(leases.get("lost", 0)),
    )


def _first_text(row: Any) -> str:
    return str(row[0])


async def blast_radius(
    conn: AsyncConnection, selection: Selection, *, top: int, sample: int
) -> BlastRadius:
    where = selected(selection, conn.dialect.name)
    active = and_(where, Ic.state == _ACTIVE)
    states: dict[str, int] = dict(
        (await conn.execute(select(Ic.state, func.count()).where(where).group_by(Ic.state))).all()
    )
    leases = (
        await conn.execute(
            select(Lc.role, Lc.kind, func.count())
            .where(Lc.state.in_(LIVE), Lc.instance_id.in_(select(Ic.instance_id).where(active)))
            .group_by(Lc.role, Lc.kind)
        )
    ).all()
    n = func.count().label("n")
    workloads = (
        await conn.execute(
            select(Ic.workload, n)
            .where(active)
            .group_by(Ic.workload)
            .order_by(n.desc(), Ic.workload)
            .limit(top)
        )
    ).all()
    workload_count = (
        await conn.execute(select(func.count(distinct(Ic.workload))).where(active))
    ).scalar_one()
    issuers = (
        await conn.execute(
            select(Ic.issuer_name, func.count()).where(active).group_by(Ic.issuer_name)
        )
    ).all()
    ids = (
        await conn.execute(
            select(Ic.instance_id).where(active).order_by(Ic.instance_id).limit(sample)
        )
    ).scalars()
    by_role: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    for role, kind, count in leases:
        by_role[role] = by_role.get(role, 0) + int(count)
        by_kind[kind] = by_kind.get(kind, 0) + int(count)
    return BlastRadius(
        instances=int(states.get(_ACTIVE, 0)),
        already_terminated=sum(int(c) for s, c in states.items() if s != _ACTIVE),
        live_leases=sum(by_role.values()),
        leases_by_role=dict(sorted(by_role.items())),
        leases_by_kind=dict(sorted(by_kind.items())),
        workloads=tuple((w, int(c)) for w, c in workloads),
        workload_count=int(workload_count),
        issuers={str(i or "-"): int(c) for i, c in sorted(issuers, key=_first_text)},
        never_seen=tuple(await never_seen(conn, selection.instances)),
        sample=tuple(ids),
        progress=await _progress(conn, where),
    )


async def reachable(conn: AsyncConnection, selection: Selection) -> int:
    """How many instances terminating the selection would still end: its active
    instances, and the explicit ids not in the store yet (a termination tombstones them)."""
    where = selected(selection, conn.dialect.name)
    active = (
        await conn.execute(select(func.count()).where(where, Ic.state == _ACTIVE))
    ).scalar_one()
    absent = 0
    if selection.instances:
        known = (
            await conn.execute(select(func.count()).where(Ic.instance_id.in_(selection.instances)))
        ).scalar_one()
        absent = len(set(selection.instances)) - int(known)
    return int(active) + absent


async def terminate_next(
    conn: AsyncConnection,
    clock: Clock,
    selection: Selection,
    *,
    after: str | None,
    limit: int,
    actor: str,
    reason: str | None,
    incident: str | None,
    check: Callable[[int], None],
) -> TerminationBatch:
    """The next ``limit`` active instances of the selection past ``after`` (in instance id
    order, which is also the order their rows are locked in), each tombstoned with its job
    and audit event (``request_terminations``, set-based), in the caller's one transaction.
    The first batch (``after`` None) also tombstones the explicit ids the store does not
    hold, and reports every id the broker never saw.
    ``check`` is given how many instances the selection still reaches, and may refuse."""
    count = await reachable(conn, selection)
    check(count)  # may refuse before anything is written
    where = selected(selection, conn.dialect.name)
    stmt = select(Ic.instance_id).where(where, Ic.state == _ACTIVE)
    if after is not None:
        stmt = stmt.where(Ic.instance_id > after)
    ids = list((await conn.execute(stmt.order_by(Ic.instance_id).limit(limit))).scalars())
    unseen = await never_seen(conn, selection.instances) if after is None else []
    created = dict(
        await request_terminations(conn, clock, ids, actor=actor, reason=reason, incident=incident)
    )
    # A failed job of a selected instance goes again, as it would terminated alone; each
    # leaves the failed state, so a later batch does not find it again (no cursor needed).
    of_selection = select(Ic.instance_id).where(where)
    requeued = await requeue_failed(
        conn, clock, of_selection, limit=limit, actor=actor, reason=reason, incident=incident
    )
    created.update(requeued)
    held = (
        set(
            (await conn.execute(select(Ic.instance_id).where(Ic.instance_id.in_(unseen)))).scalars()
        )
        if unseen
        else set()
    )
    for instance_id in unseen:  # a few at most: each tombstoned as one alone would be
        if instance_id in held:
            continue  # tombstoned by an earlier run: reported, not terminated again
        job = await request_termination(
            conn, clock, instance_id, actor=actor, issuer=None, reason=reason, incident=incident
        )
        created.setdefault(instance_id, job.job_id)
    live: dict[str, int] = {}
    if created:
        live = dict(
            (
                await conn.execute(
                    select(Lc.instance_id, func.count())
                    .where(Lc.instance_id.in_(list(created)), Lc.state.in_(LIVE))
                    .group_by(Lc.instance_id)
                )
            ).all()
        )
    last = len(ids) < limit and len(requeued) < limit
    return TerminationBatch(
        terminated=tuple(
            Terminated(iid, job_id, int(live.get(iid, 0)))
            for iid, job_id in sorted(created.items())
        ),
        never_seen=tuple(unseen),
        # Not last for failed jobs alone: any cursor will do (a re-queued job is not failed
        # any more), the last active id, else the one given, else the last re-queued.
        next=None if last else (ids[-1] if ids else after or requeued[-1][0]),
        reachable=count,
        left=await untouched(conn, where) if last else None,
    )


async def untouched(conn: AsyncConnection, where: Any) -> int:
    """What a bulk termination has still to do in the selection: its active instances
    (one may have appeared behind the cursor while batches ran) and its failed jobs."""
    active = (
        await conn.execute(select(func.count()).where(where, Ic.state == _ACTIVE))
    ).scalar_one()
    failed = (
        await conn.execute(
            select(func.count()).where(
                Jc.state == JobState.FAILED.value,
                Jc.instance_id.in_(select(Ic.instance_id).where(where)),
            )
        )
    ).scalar_one()
    return int(active) + int(failed)
