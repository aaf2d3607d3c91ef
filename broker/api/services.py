"""The services the HTTP API calls: what each handler needs, declared here where it is used.
The broker's assembly provides them (``broker.app``); a handler decodes, calls one of
them, encodes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from broker.api.operators import Operator, Scope
from broker.api.selection import TerminationOrder
from broker.audit.verify import Report
from broker.identity import Identity
from broker.issuance.service import IssuedCredential
from broker.leases import (
    AuditEventView,
    AuditSelection,
    BlastRadius,
    CheckpointView,
    InstanceListing,
    InstanceView,
    JobView,
    LeaseGroups,
    LeaseView,
    Selection,
    StoreCounts,
    Termination,
    TerminationBatch,
)
from broker.leases.views import LockView
from broker.revocation.reconcile import ReconcileReport


class Credentials(Protocol):
    """Workload endpoints: issue, renew and release, and end the caller's own instance,
    for a verified identity."""

    async def issue(
        self, identity: Identity, role: str, ttl: int | None, params: dict[str, Any]
    ) -> IssuedCredential: ...

    def issued_kind(self, identity: Identity, role: str) -> str | None: ...

    async def renew(self, identity: Identity, lease_id: str, ttl: int | None) -> dict[str, Any]: ...

    async def release(self, identity: Identity, lease_id: str) -> str: ...

    async def terminate_self(self, identity: Identity, reason: str | None) -> JobView: ...


class AdminReads(Protocol):
    """Admin listings: what the broker holds (instances, leases, jobs), read."""

    async def instance(
        self, instance_id: str
    ) -> tuple[InstanceView, list[LeaseView], JobView | None]: ...

    async def leases(
        self,
        *,
        instance: str | None,
        workload: str | None,
        role: str | None,
        state: str | None,
        limit: int,
        after: str | None,
    ) -> list[LeaseView]: ...

    async def lease(
        self, lease_id: str, *, vault: bool
    ) -> tuple[LeaseView, dict[str, Any] | None]: ...

    async def lease_counts(
        self, *, group_by: str, states: Sequence[str], top: int
    ) -> LeaseGroups: ...

    async def instances(
        self,
        *,
        state: str | None,
        workload: str | None,
        issuer: str | None,
        since: datetime | None,
        limit: int,
        after: tuple[datetime, str] | None,
    ) -> list[InstanceListing]: ...

    async def jobs(
        self,
        *,
        state: str | None,
        instance: str | None,
        since: datetime | None,
        limit: int,
        after: tuple[datetime, str] | None,
    ) -> list[JobView]: ...


class AdminActions(Protocol):
    """An operator's actions on instances, jobs and leases: terminate one (saying whether
    the broker never saw it), a selection's blast radius and its bulk termination, retry a
    failed job, reconcile now, mark a lost lease resolved."""

    async def terminate(
        self,
        instance_id: str,
        operator: Operator,
        *,
        reason: str | None = None,
        incident: str | None = None,
    ) -> Termination: ...

    async def selection(self, selection: Selection) -> BlastRadius: ...

    async def terminate_selection(
        self, order: TerminationOrder, operator: Operator
    ) -> TerminationBatch: ...

    async def retry(
        self,
        job_id: str,
        operator: Operator,
        *,
        reason: str | None = None,
        incident: str | None = None,
    ) -> JobView: ...

    async def reconcile(
        self,
        revoke_orphans: bool | None,
        operator: Operator,
        *,
        reason: str | None = None,
        incident: str | None = None,
    ) -> ReconcileReport: ...

    async def resolve(
        self, lease_id: str, operator: Operator, *, reason: str, incident: str | None
    ) -> tuple[LeaseView, bool]: ...


class PolicyQuestions(Protocol):
    """Why a token would get a role or not, and what claims would get: answers that
    issue, record and use up nothing."""

    async def explain(self, token: str, role: str, ttl: int | None) -> dict[str, Any]: ...

    async def preview(
        self, issuer: str, claims: Mapping[str, Any], roles: Sequence[str], ttl: int | None
    ) -> dict[str, Any]: ...


class LockControl(Protocol):
    """Locks: an operator's create, list and remove."""

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
    ) -> LockView: ...

    async def locks(self, *, include_inactive: bool) -> list[LockView]: ...

    async def remove_lock(
        self, lock_id: str, operator: Operator, *, reason: str | None, incident: str | None
    ) -> LockView: ...


@dataclass(frozen=True)
class Admin:
    """Admin endpoints: what the broker holds, and the operator's actions on it, one
    service per concern; each handler reaches the one it needs."""

    reads: AdminReads
    actions: AdminActions
    policy: PolicyQuestions
    locks: LockControl


class Authenticator(Protocol):
    """Who an admin caller is (``broker.api.auth.OperatorAuthenticator``): the operator,
    or ``OperatorRefused`` naming who was refused for the audit."""

    async def authenticate(self, presented: str, needed: Scope) -> Operator: ...


class RefusalAudit(Protocol):
    """Refusals into the audit, bounded against floods (``broker.leases.refusals``)."""

    async def refused(
        self,
        actor: str,
        action: str,
        *,
        outcome: str = ...,
        reason: str | None = ...,
        **detail: str,
    ) -> None: ...


class AuditTrail(Protocol):
    """The audit chain's verification (``broker.audit.service.AuditVerification``)."""

    async def verify(
        self, from_seq: int = 1, collected: Sequence[CheckpointView] = ()
    ) -> Report: ...


class EventReceiver(Protocol):
    """The signed event webhook: checks the signature and the replay record, terminates
    each instance; answers per instance with its job or the code of its refusal."""

    async def receive(
        self, body: bytes, *, timestamp: str | None, signature: str | None
    ) -> list[tuple[str, JobView | str]]: ...


class Readiness(Protocol):
    """/readyz, and the store's figures for /metrics (None when they could not be read)."""

    async def checks(self) -> dict[str, str]: ...

    async def counts(self) -> StoreCounts | None: ...


class AuditReader(Protocol):
    """The audit trail read out: events after a seq that match a selection, oldest first
    (the first ``limit`` of them, or with ``newest`` the last: a tail)."""

    async def events(
        self, selection: AuditSelection, *, after: int, limit: int, newest: bool = False
    ) -> list[AuditEventView]: ...
