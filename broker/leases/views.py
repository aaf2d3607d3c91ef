"""What the ledgers hand out: frozen views of their rows and the small values their
callers pass in. Plain data; how it is shown to a client is the API's business."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.errors import RevocationWaiting


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class LeaseLimit:
    max_leases: int
    on_limit: str  # "revoke_oldest" | "refuse"


@dataclass(frozen=True)
class IssueTicket:
    lease_id: str
    superseded: tuple[tuple[str, str], ...]  # (lease_id, vault_lease_id) to revoke


class LeasesStillLive(RevocationWaiting):
    """A job cannot finish: some lease of its instance is still issuing or active."""


@dataclass(frozen=True)
class LeaseView:
    lease_id: str
    instance_id: str
    workload: str
    role: str
    kind: str
    state: str
    renewable: bool
    created_at: datetime
    issued_at: datetime | None
    expires_at: datetime | None
    ended_at: datetime | None
    vault_lease_id: str | None
    token_accessor: str | None
    # What termination acts on outside Vault (an STS session it denies in IAM), or None.
    external_ref: dict[str, Any] | None = None
    vault_path: str | None = None  # where the credential was asked for


@dataclass(frozen=True)
class JobView:
    job_id: str
    instance_id: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    requested_by: str
    created_at: datetime
    completed_at: datetime | None
    reason: str | None = None
    incident: str | None = None


@dataclass(frozen=True)
class InstanceView:
    instance_id: str
    state: str
    issuer_name: str | None
    workload: str | None
    created_at: datetime
    terminated_at: datetime | None


@dataclass(frozen=True)
class TokenView:
    accessor: str
    expires_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class RevocationWork:
    tokens: tuple[TokenView, ...]
    leases: tuple[LeaseView, ...]  # leases still live (issuing or active)


@dataclass(frozen=True)
class StoreCounts:
    leases: dict[tuple[str, str], int]  # (role, state) → count, live states only
    queue_depth: int
    oldest_job_age_s: float
    failed_jobs: int


@dataclass(frozen=True)
class LockView:
    """A lock: refuses new credentials and renewals that match (``broker.leases.locks``)."""

    lock_id: str
    kind: str  # workload | issuer | role | claim
    value: str
    claim: str | None
    reason: str
    incident: str | None
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    removed_at: datetime | None = None
    removed_by: str | None = None
