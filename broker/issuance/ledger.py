"""What issuance reads and writes of the lease ledgers: exactly the calls
``CredentialService`` makes (``broker.leases.IssuanceRecords`` implements them)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from broker.leases import IssueTicket, IssuingRow, LeaseLimit, LeaseState, LeaseView
from broker.leases.locks import LockSubject


class IssuanceLedger(Protocol):
    async def begin_issue(
        self,
        *,
        instance_id: str,
        issuer_name: str,
        workload: str,
        role: str,
        kind: str,
        token_id: tuple[str, datetime] | None = None,
        limit: LeaseLimit | None = None,
        external_ref: dict[str, Any] | None = None,
        vault_path: str | None = None,
        lock_subject: LockSubject | None = None,
        claims: dict[str, Any] | None = None,
    ) -> IssueTicket: ...

    async def refuse_if_locked(self, subject: LockSubject) -> None: ...

    async def complete_issue(
        self,
        lease_id: str,
        *,
        vault_lease_id: str | None,
        accessor: str,
        renewable: bool,
        issued_at: datetime,
        expires_at: datetime,
        state: LeaseState = LeaseState.ACTIVE,
        created_after: datetime | None = None,
        engine: str | None = None,
        token_id: tuple[str, str] | None = None,
        lock_subject: LockSubject | None = None,
        credential_ref: dict[str, str] | None = None,
        issuing: IssuingRow | None = None,
    ) -> bool: ...

    async def fail_issue(
        self, lease_id: str, code: str, *, release_token_id: tuple[str, str] | None = None
    ) -> None: ...

    async def get_lease(self, lease_id: str) -> LeaseView: ...

    async def instance_state(self, instance_id: str) -> tuple[str, str | None] | None: ...

    async def set_lease_expiry(
        self,
        lease_id: str,
        expires_at: datetime,
        renewable: bool,
        lock_subject: LockSubject | None = None,
    ) -> str | None: ...

    async def end_lease(self, lease_id: str, state: LeaseState, actor: str) -> bool: ...
