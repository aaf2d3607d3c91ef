"""Bulk termination of a selection of instances (``brokerctl revoke`` with selectors):
its blast radius first, then its termination in bounded batches, each one transaction
recording one revocation job per instance (``broker.leases.sql.selection``). The caller
loops over the cursor; no request holds a transaction or a lock for the whole set.

The guard is a pure decision: a termination that could reach more than one instance
needs a reason, and one that reaches more than the caller's ``max`` is refused whole."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Protocol

from broker.errors import BadRequest, SelectionTooLarge
from broker.leases import BlastRadius, Selection, TerminationBatch

# Workloads listed by name in a blast radius (the count covers them all), and instance
# ids shown as a sample.
TOP_WORKLOADS = 20
SAMPLE_INSTANCES = 20
MAX_BATCH = 1000
DEFAULT_BATCH = 200


class SelectionLedger(Protocol):
    async def blast_radius(self, chosen: Selection, *, top: int, sample: int) -> BlastRadius: ...

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
    ) -> TerminationBatch: ...


class Forgets(Protocol):
    """This replica's cache of instance tokens."""

    def forget(self, instance_id: str) -> None: ...


def guard(reachable: int, *, reason: str | None, max_instances: int | None) -> None:
    """Refuse a bulk termination before it writes anything: more instances than the
    caller's ``max_instances`` (409 ``selection_too_large``), or more than one without a
    reason (400 ``reason_required``)."""
    if max_instances is not None and reachable > max_instances:
        raise SelectionTooLarge(
            f"the selection reaches {reachable} instance(s), more than max {max_instances}; "
            "narrow it, or raise max after a dry run"
        )
    if reachable > 1 and not reason:
        raise BadRequest(
            f"the selection reaches {reachable} instances: say why in 'reason'",
            code="reason_required",
        )


class BulkTerminator:
    """The blast radius of a selection, and its termination batch by batch. After each
    batch this replica forgets the instances' tokens and wakes its revocation worker, as
    ``Terminator`` does for one instance."""

    def __init__(
        self,
        ledger: SelectionLedger,
        tokens: Forgets,
        wake_revocation: Callable[[], None],
        engines: Mapping[str, str],
    ) -> None:
        self._ledger = ledger
        self._tokens = tokens
        self._wake_revocation = wake_revocation
        self._engines = engines  # role -> engine, for leases by engine

    async def blast_radius(self, selection: Selection) -> BlastRadius:
        """What terminating the selection would reach, with its live leases by engine too
        (a role no longer configured counts under '-')."""
        radius = await self._ledger.blast_radius(
            selection, top=TOP_WORKLOADS, sample=SAMPLE_INSTANCES
        )
        by_engine: dict[str, int] = {}
        for role, count in radius.leases_by_role.items():
            engine = self._engines.get(role, "-")
            by_engine[engine] = by_engine.get(engine, 0) + count
        return replace(radius, leases_by_engine=dict(sorted(by_engine.items())))

    async def terminate(
        self,
        selection: Selection,
        *,
        after: str | None,
        batch: int,
        max_instances: int | None,
        actor: str,
        reason: str | None,
        incident: str | None,
    ) -> TerminationBatch:
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError("the caller bounds the batch")

        def check(reachable: int) -> None:
            guard(reachable, reason=reason, max_instances=max_instances)

        result = await self._ledger.terminate_next(
            selection,
            after=after,
            limit=batch,
            actor=actor,
            reason=reason,
            incident=incident,
            check=check,
        )
        for done in result.terminated:
            self._tokens.forget(done.instance_id)
        if result.terminated:
            self._wake_revocation()
        return result
