"""The services the HTTP API calls: what each handler needs, declared here where it is used.
The broker's assembly provides them (``broker.app``); a handler decodes, calls one of
them, encodes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from broker.api.operators import Operator
from broker.api.selection import TerminationOrder
from broker.identity import Identity
from broker.issuance.service import IssuedCredential
from broker.leases import (
    BlastRadius,
    InstanceView,
    JobView,
    LeaseView,
    Selection,
    StoreCounts,
    TerminationBatch,
)
from broker.revocation.reconcile import ReconcileReport


class Credentials(Protocol):
    """Workload endpoints: issue, renew and release, and end the caller's own instance,
    for a verified identity."""

    async def issue(
        self, identity: Identity, role: str, ttl: int | None, params: dict[str, Any]
    ) -> IssuedCredential: ...

    async def renew(self, identity: Identity, lease_id: str, ttl: int | None) -> dict[str, Any]: ...

    async def release(self, identity: Identity, lease_id: str) -> None: ...

    async def terminate_self(self, identity: Identity, reason: str | None) -> JobView: ...


class Admin(Protocol):
    """Admin endpoints: what the broker holds, and the operator's actions on it."""

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

    async def jobs(self, *, state: str | None) -> list[JobView]: ...

    async def terminate(self, instance_id: str, operator: Operator) -> JobView: ...

    async def never_seen(self, instance_id: str) -> bool: ...

    async def selection(self, selection: Selection) -> BlastRadius: ...

    async def terminate_selection(
        self, order: TerminationOrder, operator: Operator
    ) -> TerminationBatch: ...

    async def retry(self, job_id: str, operator: Operator) -> JobView: ...

    async def reconcile(self, revoke_orphans: bool | None) -> ReconcileReport: ...

    async def explain(self, token: str, role: str, ttl: int | None) -> dict[str, Any]: ...

    def preview(
        self, issuer: str, claims: Mapping[str, Any], roles: Sequence[str], ttl: int | None
    ) -> dict[str, Any]: ...


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
