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
class IssuingRow:
    """Whose ``issuing`` row ``begin_issue`` wrote: what its completion's audit event names
    (and the one-round-trip completion checks against the row)."""

    instance_id: str
    issuer_name: str
    workload: str
    role: str
    kind: str


@dataclass(frozen=True)
class IssueTicket:
    lease_id: str
    superseded: tuple[tuple[str, str], ...]  # (lease_id, vault_lease_id) to revoke
    issuing: IssuingRow | None = None


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
    # The credential's non-secret identifier (``{"username": ...}``), or None.
    credential_ref: dict[str, str] | None = None
    # When the broker first sent a revocation covering this lease (Vault knew it then).
    revoke_sent_at: datetime | None = None
    # A lost lease an operator marked resolved: when, who, why, which incident.
    resolved_at: datetime | None = None
    resolved_by: str | None = None
    resolved_reason: str | None = None
    resolved_incident: str | None = None


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
class Termination:
    """A termination's answer: the instance's revocation job, and whether the broker never
    saw the instance (no sighting, no lease: the termination only tombstoned it)."""

    job: JobView
    never_seen: bool


@dataclass(frozen=True)
class InstanceView:
    instance_id: str
    state: str
    issuer_name: str | None
    workload: str | None
    created_at: datetime
    terminated_at: datetime | None


@dataclass(frozen=True)
class InstanceListing:
    """An instance as a listing shows it: with how many leases it holds, by state."""

    instance: InstanceView
    leases: dict[str, int]


@dataclass(frozen=True)
class LeaseGroups:
    """Leases counted by one attribute, largest first: the first ``top`` groups, with the
    total over every group and how many groups there are."""

    group_by: str
    groups: tuple[tuple[str | None, int], ...]
    total: int
    group_count: int


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
class AuditEventView:
    """One stored link of the audit chain, as read back (``row_id`` is the insertion
    order, which is not hashed: it lets a verifier see rows whose seqs were swapped)."""

    row_id: int
    seq: int
    at: datetime
    actor: str
    action: str
    instance_id: str | None
    lease_id: str | None
    outcome: str
    reason: str | None
    detail: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class CheckpointView:
    """A signed statement of the chain's head: event ``seq`` has ``hash``, at ``at``.
    ``key_id``: ``transit:<key>:v<N>`` or ``file:<fingerprint>``; ``signature``: base64 of
    the raw Ed25519 signature (``broker.audit.checkpoint`` says what it covers).
    ``source``: where it was read (``store``, the database table, or a file or log outside
    it)."""

    seq: int
    hash: str
    at: datetime
    signer: str
    key_id: str
    signature: str
    source: str = "store"


@dataclass(frozen=True)
class AuditSelection:
    """Which audit events a listing wants (every field given must match)."""

    instance: str | None = None
    lease: str | None = None  # the event names this lease (its ``lease_id``)
    workload: str | None = None  # the event's instance runs this workload
    role: str | None = None  # the event's lease is of this role
    action: str | None = None
    actor: str | None = None
    since: datetime | None = None


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
