"""The admin and readiness services the HTTP API calls (``broker.api.services``), over the
ledgers, the terminator, the reconciler and the probes: one admin service per concern
(listings, actions, policy questions, locks), each over the ledger methods it uses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from broker.api.locks import check_lock_target
from broker.api.operators import Operator
from broker.api.selection import TerminationOrder
from broker.api.views import lock_public
from broker.clock import Clock, iso_z
from broker.engines.role import RoleSettings
from broker.errors import BadRequest, BrokerError, TokenInvalid
from broker.identity import IdentityVerifier
from broker.identity.settings import IssuerSettings
from broker.leases import (
    BlastRadius,
    InstanceListing,
    InstanceView,
    JobView,
    LeaseGroups,
    LeaseView,
    LockView,
    Selection,
    StoreCounts,
    Termination,
    TerminationBatch,
)
from broker.leases.locks import LockSubject, refusing_lock
from broker.policy.explain import decision_refusal, explain, instance_refusal, preview
from broker.policy.settings import Rule
from broker.revocation.reconcile import ReconcileReport
from broker.vault import VaultClient
from broker.vault.client import LeaseInfo


class AdminReadRecords(Protocol):
    """The admin listings' reads of the lease ledgers."""

    async def get_instance(
        self, instance_id: str
    ) -> tuple[InstanceView, list[LeaseView], JobView | None]: ...

    async def get_lease(self, lease_id: str) -> LeaseView: ...

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

    async def count_leases(
        self, *, group_by: str, states: Sequence[str], top: int
    ) -> LeaseGroups: ...

    async def list_instances(
        self,
        *,
        state: str | None = None,
        workload: str | None = None,
        issuer: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        after: tuple[datetime, str] | None = None,
    ) -> list[InstanceListing]: ...

    async def list_jobs(
        self,
        *,
        state: str | None = None,
        limit: int = 100,
        instance: str | None = None,
        since: datetime | None = None,
        after: tuple[datetime, str] | None = None,
    ) -> list[JobView]: ...


class ActionRecords(Protocol):
    """An operator's retry of a failed job, and the audit event of a reconcile they asked
    for."""

    async def retry_job(
        self, job_id: str, *, actor: str, reason: str | None = None, incident: str | None = None
    ) -> JobView: ...

    async def record_audit(self, actor: str, action: str, **detail: Any) -> None: ...


class LostResolution(Protocol):
    """An operator's marker on a lost lease they ended by hand
    (``broker.leases.EndingRecords.resolve_lost``)."""

    async def resolve_lost(
        self, lease_id: str, *, actor: str, reason: str, incident: str | None
    ) -> tuple[LeaseView, bool]: ...


class InstanceStanding(Protocol):
    """An instance and its job, as ``policy explain`` reads them."""

    async def instance_standing(
        self, instance_id: str
    ) -> tuple[InstanceView, JobView | None] | None: ...


class AdminLocks(Protocol):
    """Locks: an operator's create, list and remove."""

    async def create_lock(
        self,
        *,
        kind: str,
        value: str,
        claim: str | None,
        reason: str,
        incident: str | None,
        expires_at: Any,
        actor: str,
    ) -> LockView: ...

    async def list_locks(self, *, include_inactive: bool = False) -> list[LockView]: ...

    async def remove_lock(
        self, lock_id: str, *, actor: str, reason: str | None, incident: str | None
    ) -> LockView: ...


class ActiveLocks(Protocol):
    """The locks in force now, which ``policy explain`` and ``preview`` show."""

    async def active_locks(self) -> list[LockView]: ...


class LeaseLookup(Protocol):
    """What Vault says of a lease now (``sys/leases/lookup``): None when it does not know it."""

    async def lookup_lease(self, lease_id: str) -> LeaseInfo | None: ...


class RequestTermination(Protocol):
    """One instance's termination, answered with whether the broker never saw it
    (``broker.revocation.terminator.Terminator.request``)."""

    async def __call__(
        self,
        instance_id: str,
        *,
        actor: str,
        reason: str | None = None,
        incident: str | None = None,
    ) -> Termination: ...


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


class ListingService:
    """What the broker holds, as the admin listings read it; a lease with Vault's view of it."""

    def __init__(self, queries: AdminReadRecords, *, vault: LeaseLookup, clock: Clock) -> None:
        self._queries = queries
        self._vault = vault
        self._clock = clock

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

    async def lease(
        self, lease_id: str, *, vault: bool
    ) -> tuple[LeaseView, dict[str, Any] | None]:
        """The lease as the store holds it and, with ``vault``, as Vault sees it now."""
        lease = await self._queries.get_lease(lease_id)
        return lease, (await self._vault_view(lease) if vault else None)

    async def _vault_view(self, lease: LeaseView) -> dict[str, Any]:
        """Vault's lease lookup: times and renewability (never a secret), or the code of
        why there is none: ``no_vault_lease`` (a credential without one, e.g. kv),
        ``lease_unknown`` (Vault does not know it: gone, or lost), or Vault's error."""
        if lease.vault_lease_id is None:
            return {"error": "no_vault_lease"}
        try:
            info = await self._vault.lookup_lease(lease.vault_lease_id)
        except BrokerError as exc:
            return {"error": exc.code}
        if info is None:
            return {"error": "lease_unknown"}
        ttl = (info.expire_time - self._clock.now()).total_seconds() if info.expire_time else None
        return {
            "lease_id": info.lease_id,
            "issue_time": iso_z(info.issue_time) if info.issue_time else None,
            "expire_time": iso_z(info.expire_time) if info.expire_time else None,
            "ttl": max(0, int(ttl)) if ttl is not None else None,
            "renewable": info.renewable,
        }

    async def lease_counts(
        self, *, group_by: str, states: Sequence[str], top: int
    ) -> LeaseGroups:
        return await self._queries.count_leases(group_by=group_by, states=states, top=top)

    async def instances(
        self,
        *,
        state: str | None,
        workload: str | None,
        issuer: str | None,
        since: datetime | None,
        limit: int,
        after: tuple[datetime, str] | None,
    ) -> list[InstanceListing]:
        return await self._queries.list_instances(
            state=state, workload=workload, issuer=issuer, since=since, limit=limit, after=after
        )

    async def jobs(
        self,
        *,
        state: str | None,
        instance: str | None,
        since: datetime | None,
        limit: int,
        after: tuple[datetime, str] | None,
    ) -> list[JobView]:
        return await self._queries.list_jobs(
            state=state, instance=instance, since=since, limit=limit, after=after
        )


class ActionService:
    """An operator's actions on instances, jobs and lost leases; every one is recorded as
    its operator."""

    def __init__(
        self,
        queries: ActionRecords,
        *,
        terminate: RequestTermination,
        reconcile: Callable[[bool | None], Awaitable[ReconcileReport]],
        bulk: BulkTermination,
        resolutions: LostResolution,
    ) -> None:
        self._queries = queries
        self._terminate = terminate
        self._reconcile = reconcile
        self._bulk = bulk
        self._resolutions = resolutions

    async def terminate(
        self,
        instance_id: str,
        operator: Operator,
        *,
        reason: str | None = None,
        incident: str | None = None,
    ) -> Termination:
        """The job, and whether the broker never saw the instance (it was only tombstoned)."""
        return await self._terminate(
            instance_id, actor=operator.actor, reason=reason, incident=incident
        )

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

    async def retry(
        self,
        job_id: str,
        operator: Operator,
        *,
        reason: str | None = None,
        incident: str | None = None,
    ) -> JobView:
        job = await self._queries.retry_job(
            job_id, actor=operator.actor, reason=reason, incident=incident
        )
        await self._terminate(job.instance_id, actor=operator.actor)  # wakes this replica's worker
        return job

    async def reconcile(
        self,
        revoke_orphans: bool | None,
        operator: Operator,
        *,
        reason: str | None = None,
        incident: str | None = None,
    ) -> ReconcileReport:
        said = {"incident": incident} if incident else {}
        await self._queries.record_audit(
            operator.actor,
            "reconcile.requested",
            reason=reason,
            revoke_orphans=bool(revoke_orphans),
            **said,
        )
        return await self._reconcile(revoke_orphans)

    async def resolve(
        self, lease_id: str, operator: Operator, *, reason: str, incident: str | None
    ) -> tuple[LeaseView, bool]:
        """Mark a lost lease resolved: the operator ended its credential by hand."""
        return await self._resolutions.resolve_lost(
            lease_id, actor=operator.actor, reason=reason, incident=incident
        )


class PolicyService:
    """``policy explain`` and ``policy preview``: the policy's answer, the instance's tombstone
    and the locks, for a token or for claims; verifies what it is given and records nothing."""

    def __init__(
        self,
        queries: InstanceStanding,
        *,
        verifier: IdentityVerifier,
        roles: Mapping[str, RoleSettings],
        rules: tuple[Rule, ...],
        issuers: Sequence[IssuerSettings],
        audience: str,
        locks: ActiveLocks,
        clock: Clock,
    ) -> None:
        self._queries = queries
        self._verifier = verifier
        self._roles = roles
        self._rules = rules
        self._issuers = {issuer.name: issuer for issuer in issuers}
        self._audience = audience
        self._locks = locks
        self._clock = clock

    def _refusing_lock(
        self,
        locks: Sequence[LockView],
        issuer: str,
        workload: str,
        role: str,
        claims: Mapping[str, Any],
    ) -> dict[str, Any] | None:
        """The lock that would refuse this request now, shown; None if none would."""
        lock = refusing_lock(
            locks,
            LockSubject(issuer=issuer, workload=workload, role=role, claims=claims),
            self._clock.now(),
        )
        return lock_public(lock) if lock is not None else None

    async def explain(self, token: str, role: str, ttl: int | None) -> dict[str, Any]:
        """Which issuer verified the token, the identity it produced, which rule matched,
        and the verdict: ``granted`` only when nothing refuses, each refusal listed (the
        token, the policy, the instance's tombstone, a lock). Issues
        nothing, records nothing, and does not use up the token's jti."""
        try:
            identity = await self._verifier.verify(token)
        except TokenInvalid as exc:
            error = {"code": exc.code, "message": exc.message}
            return {
                "token": {"valid": False, "issuer": exc.issuer_name, "error": error},
                "identity": None,
                "decision": None,
                "instance": None,
                "refusals": [error],
                "verdict": "refused",
            }
        decision = explain(identity, role, ttl, roles=self._roles, rules=self._rules)
        standing = await self._queries.instance_standing(identity.instance_id)
        instance, job = standing if standing else (None, None)
        # Terminated: since the job finished; terminating: since it was asked for.
        since = instance.terminated_at if instance else None
        terminated = instance_refusal(
            identity.instance_id,
            instance.state if instance else None,
            since=since or (job.created_at if job else None),
            by=job.requested_by if job else None,
        )
        refusals = [r for r in (decision_refusal(decision), terminated) if r is not None]
        # A lock refuses whatever the rules say: shown, and the decision says so.
        lock = self._refusing_lock(
            await self._locks.active_locks(),
            identity.issuer_name,
            identity.workload,
            role,
            identity.claims,
        )
        if lock is not None:
            decision = {
                **decision,
                "allowed": False,
                "reason": f"refused by lock {lock['lock_id']} ({lock['reason']})",
            }
            refusals.append(
                {
                    "code": "locked",
                    "message": f"refused by lock {lock['lock_id']} ({lock['reason']})",
                    "lock_id": lock["lock_id"],
                }
            )
        return {
            "token": {"valid": True, "issuer": identity.issuer_name, "error": None},
            "identity": identity.public(),
            "decision": decision,
            "instance": {"state": instance.state if instance else "never_seen"},
            "refusals": refusals,
            "verdict": "refused" if refusals else "granted",
            "lock": lock,
        }

    async def preview(
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
        answer = preview(
            settings,
            claims,
            roles,
            ttl,
            roles=self._roles,
            rules=self._rules,
            audience=self._audience,
        )
        workload, locks = answer["identity"]["workload"], await self._locks.active_locks()
        for entry in answer["roles"]:
            lock = self._refusing_lock(locks, settings.name, workload, entry["role"], claims)
            if lock is not None and entry["granted"]:
                entry.update(
                    granted=False,
                    code="locked",
                    reason=f"refused by lock {lock['lock_id']} ({lock['reason']})",
                    ttl=None,
                    lock_id=lock["lock_id"],
                )
        return answer


class LockService:
    """Locks an operator creates, lists and removes; each is recorded as its operator."""

    def __init__(
        self,
        locks: AdminLocks,
        *,
        clock: Clock,
        roles: Sequence[str],
        issuers: Mapping[str, str],
    ) -> None:
        self._locks = locks
        self._clock = clock
        self._roles = list(roles)
        self._issuers = dict(issuers)  # configured name → issuer URL

    async def create_lock(
        self,
        operator: Operator,
        *,
        kind: str,
        value: str,
        claim: str | None,
        ttl: int | None,
        reason: str,
        incident: str | None,
    ) -> LockView:
        # A lock that could never match is refused, not silently kept (a role or issuer
        # named as the operator remembered it, not as the broker is configured).
        check_lock_target(kind, value, roles=self._roles, issuers=self._issuers)
        expires_at = self._clock.now() + timedelta(seconds=ttl) if ttl else None
        return await self._locks.create_lock(
            kind=kind,
            value=value,
            claim=claim,
            reason=reason,
            incident=incident,
            expires_at=expires_at,
            actor=operator.actor,
        )

    async def locks(self, *, include_inactive: bool) -> list[LockView]:
        return await self._locks.list_locks(include_inactive=include_inactive)

    async def remove_lock(
        self, lock_id: str, operator: Operator, *, reason: str | None, incident: str | None
    ) -> LockView:
        return await self._locks.remove_lock(
            lock_id, actor=operator.actor, reason=reason, incident=incident
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
            ("ok" if await self._vault.own.valid() else "token_invalid")
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
