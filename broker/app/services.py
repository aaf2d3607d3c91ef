"""The admin and readiness services the HTTP API calls (``broker.api.services``), over the
ledgers, the terminator, the reconciler and the probes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from broker.api.operators import Operator
from broker.api.selection import TerminationOrder
from broker.engines.role import RoleSettings
from broker.errors import BadRequest, BrokerError, TokenInvalid
from broker.events import Terminate
from broker.identity import IdentityVerifier
from broker.identity.settings import IssuerSettings
from broker.leases import (
    BlastRadius,
    InstanceView,
    JobView,
    LeaseView,
    Selection,
    StoreCounts,
    TerminationBatch,
)
from broker.policy.explain import explain, preview
from broker.policy.settings import Rule
from broker.revocation.reconcile import ReconcileReport
from broker.vault import VaultClient


class AdminQueries(Protocol):
    """The admin endpoints' reads of the lease ledgers, and their retry of a failed job."""

    async def get_instance(
        self, instance_id: str
    ) -> tuple[InstanceView, list[LeaseView], JobView | None]: ...

    async def list_leases(
        self,
        *,
        instance: str | None = None,
        workload: str | None = None,
        role: str | None = None,
        state: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[LeaseView]: ...

    async def list_jobs(self, *, state: str | None = None, limit: int = 100) -> list[JobView]: ...

    async def retry_job(self, job_id: str, *, actor: str) -> JobView: ...


class NeverSeen(Protocol):
    """Which instance ids the broker never saw (``SelectionRecords.never_seen``)."""

    async def never_seen(self, instance_ids: Sequence[str]) -> list[str]: ...


class BulkTermination(Protocol):
    """A selection's blast radius and its termination batch by batch
    (``broker.revocation.bulk.BulkTerminator``)."""

    async def blast_radius(self, selection: Selection) -> BlastRadius: ...

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
    ) -> TerminationBatch: ...


class AdminService:
    """What an operator asks of the broker; every action is recorded as its operator."""

    def __init__(
        self,
        queries: AdminQueries,
        *,
        terminate: Terminate,
        reconcile: Callable[[bool | None], Awaitable[ReconcileReport]],
        verifier: IdentityVerifier,
        roles: Mapping[str, RoleSettings],
        rules: tuple[Rule, ...],
        issuers: Sequence[IssuerSettings],
        audience: str,
        bulk: BulkTermination,
        seen: NeverSeen,
    ) -> None:
        self._bulk = bulk
        self._seen = seen
        self._queries = queries
        self._terminate = terminate
        self._reconcile = reconcile
        self._verifier = verifier
        self._roles = roles
        self._rules = rules
        self._issuers = {issuer.name: issuer for issuer in issuers}
        self._audience = audience

    async def instance(
        self, instance_id: str
    ) -> tuple[InstanceView, list[LeaseView], JobView | None]:
        return await self._queries.get_instance(instance_id)

    async def leases(
        self,
        *,
        instance: str | None,
        workload: str | None,
        role: str | None,
        state: str | None,
        limit: int,
        after: str | None,
    ) -> list[LeaseView]:
        return await self._queries.list_leases(
            instance=instance, workload=workload, role=role, state=state, limit=limit, after=after
        )

    async def jobs(self, *, state: str | None) -> list[JobView]:
        return await self._queries.list_jobs(state=state)

    async def terminate(self, instance_id: str, operator: Operator) -> JobView:
        return await self._terminate(instance_id, actor=operator.actor)

    async def never_seen(self, instance_id: str) -> bool:
        """Whether the broker never saw the instance (a termination only tombstoned it)."""
        return bool(await self._seen.never_seen([instance_id]))

    async def selection(self, selection: Selection) -> BlastRadius:
        return await self._bulk.blast_radius(selection)

    async def terminate_selection(
        self, order: TerminationOrder, operator: Operator
    ) -> TerminationBatch:
        return await self._bulk.terminate(
            order.selection,
            after=order.after,
            batch=order.batch,
            max_instances=order.max_instances,
            actor=operator.actor,
            reason=order.reason,
            incident=order.incident,
        )

    async def retry(self, job_id: str, operator: Operator) -> JobView:
        job = await self._queries.retry_job(job_id, actor=operator.actor)
        await self._terminate(job.instance_id, actor=operator.actor)  # wakes this replica's worker
        return job

    async def reconcile(self, revoke_orphans: bool | None) -> ReconcileReport:
        return await self._reconcile(revoke_orphans)

    async def explain(self, token: str, role: str, ttl: int | None) -> dict[str, Any]:
        """Which issuer verified the token, the identity it produced, which rule matched
        and why the role would be granted or refused. Issues nothing, records nothing,
        and does not use up the token's jti."""
        try:
            identity = await self._verifier.verify(token)
        except TokenInvalid as exc:
            return {
                "token": {
                    "valid": False,
                    "issuer": exc.issuer_name,
                    "error": {"code": exc.code, "message": exc.message},
                },
                "identity": None,
                "decision": None,
            }
        decision = explain(identity, role, ttl, roles=self._roles, rules=self._rules)
        return {
            "token": {"valid": True, "issuer": identity.issuer_name, "error": None},
            "identity": identity.public(),
            "decision": decision,
        }

    def preview(
        self, issuer: str, claims: Mapping[str, Any], roles: Sequence[str], ttl: int | None
    ) -> dict[str, Any]:
        """Whether a token of the named issuer carrying ``claims`` would be granted each
        role (``broker.policy.explain.preview``). Verifies, issues and records nothing."""
        settings = self._issuers.get(issuer)
        if settings is None:
            # Not which issuers exist: the configuration is the place to read that.
            raise BadRequest(
                "'issuer' is not the name of an issuer configured on this broker",
                code="invalid_issuer",
            )
        return preview(
            settings,
            claims,
            roles,
            ttl,
            roles=self._roles,
            rules=self._rules,
            audience=self._audience,
        )


class LedgerCounts(Protocol):
    """Live leases by role and state, and the revocation queue, for the metrics."""

    async def counts(self) -> StoreCounts: ...


class Reachable(Protocol):
    """The lease database, as readiness sees it."""

    async def ping(self) -> None: ...


class Readiness:
    """Whether the broker can serve (the lease database and Vault), and the store's figures
    the metrics show."""

    def __init__(self, *, database: Reachable, vault: VaultClient, counts: LedgerCounts) -> None:
        self._database = database
        self._vault = vault
        self._counts = counts

    async def checks(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            await self._database.ping()
            checks["store"] = "ok"
        except BrokerError:
            checks["store"] = "unavailable"
        health = await self._vault.health()
        checks["vault"] = (
            "ok"
            if health.ready
            else "sealed"
            if health.reachable and health.sealed
            else "unavailable"
        )
        return checks

    async def counts(self) -> StoreCounts | None:
        try:
            return await self._counts.counts()
        except BrokerError:
            return None  # serve the last values; readiness reports the store
