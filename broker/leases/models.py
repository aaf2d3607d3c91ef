"""SQLAlchemy models of the lease store. Migrations in ``schema/`` must match these
(CI runs ``alembic check``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite keeps no zone of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the lease store")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


def _partial(where: str) -> dict[str, Any]:
    """A partial index's predicate on both backends. Written out, never bound: a query
    may use the index only if its own conditions imply this text, so the queries state
    the same values as literals (``broker.leases.sql.reconcile``)."""
    return {"postgresql_where": text(where), "sqlite_where": text(where)}


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (
        Index("ix_instances_state_seen", "state", "last_seen_at"),
        Index("ix_instances_created", "created_at", "instance_id"),
        # A bulk termination's selectors (``broker.leases.sql.selection``).
        Index("ix_instances_workload", "workload"),
        Index("ix_instances_issuer", "issuer_name"),
        # The reconciler's unseen instances of an issuer, least recently seen first: only
        # active ones, by when each was last seen (or created, never seen since), so a
        # pass reads those unseen and not every instance the issuer has.
        Index(
            "ix_instances_active_unseen",
            "issuer_name",
            text("coalesce(last_seen_at, created_at)"),
            **_partial("state = 'active'"),
        ),
    )

    instance_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    issuer_name: Mapped[str | None] = mapped_column(String(64))
    workload: Mapped[str | None] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    terminated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # When the instance last exchanged or renewed (to a minute or so: replicas record it
    # in batches). An issuer's ``liveness.unseen_grace`` terminates instances unseen longer.
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The identity's claims at first issuance (no token, no token id), so an incident
    # responder can select instances by a claim (``brokerctl revoke --claim k=v``).
    claims: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class InstanceToken(Base):
    """An instance token, by accessor. The token itself is never stored."""

    __tablename__ = "instance_tokens"

    accessor: Mapped[str] = mapped_column(String(128), primary_key=True)
    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.instance_id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Lease(Base):
    __tablename__ = "leases"
    __table_args__ = (
        Index("ix_leases_instance_state", "instance_id", "state"),
        # The lease limit's count: exactly one instance's live leases of one role.
        Index("ix_leases_instance_role_state", "instance_id", "role", "state"),
        Index("ix_leases_workload", "workload"),
        Index("ix_leases_role", "role"),
        Index("ix_leases_state_created", "state", "created_at"),
        Index("ix_leases_state_expires", "state", "expires_at"),
        # The Vault paths the broker holds leases under, one probe per path (a loose
        # index scan, ``broker.leases.sql.reconcile.vault_paths``), not the whole history.
        Index("ix_leases_vault_path", "vault_path", **_partial("vault_lease_id IS NOT NULL")),
        # The live leases with no revocation sent under one Vault path, in the order the
        # reconciler pages through them: a page reads one page of rows.
        Index(
            "ix_leases_unsent_live_path",
            "vault_path",
            "created_at",
            "lease_id",
            **_partial("state IN ('active', 'revoking') AND revoke_sent_at IS NULL"),
        ),
    )

    lease_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.instance_id"))
    workload: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    vault_lease_id: Mapped[str | None] = mapped_column(String(512), unique=True)
    token_accessor: Mapped[str | None] = mapped_column(String(128))
    renewable: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    issued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error_code: Mapped[str | None] = mapped_column(String(64))
    # What termination must act on outside Vault, recorded before the credential is
    # asked for: an STS session (``broker.aws.SessionRef``), which AWS cannot revoke and
    # the broker denies in IAM instead. Names no secret.
    external_ref: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The Vault path the credential was requested from (``database/creds/app``), written
    # with the ``issuing`` row: Vault names the lease under it, which is how the reconciler
    # finds the lease of a request that died before recording Vault's answer.
    vault_path: Mapped[str | None] = mapped_column(String(512))
    # The credential's non-secret identifier (a database username, a certificate serial),
    # written when the lease is recorded active: what an operator ends by hand if Vault
    # forgets the lease (``lost``), and what a direct check looks for.
    credential_ref: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Set (committed) just before the broker first sends a revocation that covers this
    # lease, once Vault confirmed it still knew the lease: from then on Vault not knowing
    # it is the broker's own doing (``revoked``), never a loss.
    revoke_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # A ``lost`` lease an operator marked ``resolved`` once they ended its credential by
    # hand: when, who (``operator:<name>``), why, and the incident it belongs to.
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    resolved_by: Mapped[str | None] = mapped_column(String(128))
    resolved_reason: Mapped[str | None] = mapped_column(String(200))
    resolved_incident: Mapped[str | None] = mapped_column(String(128))


class RevocationJob(Base):
    __tablename__ = "revocation_jobs"
    __table_args__ = (
        Index("ix_jobs_state_next", "state", "next_attempt_at"),
        Index("ix_jobs_created", "created_at", "job_id"),
    )

    job_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.instance_id"), unique=True)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(String(255))
    requested_by: Mapped[str] = mapped_column(String(64))
    # Why, as the requester said it (``--reason``), and the incident it belongs to.
    reason: Mapped[str | None] = mapped_column(String(200))
    incident: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class SeenToken(Base):
    """A token id (``jti``) that was used for an exchange, kept until the token expires:
    in the shared store, so that every replica refuses its replay."""

    __tablename__ = "seen_tokens"
    __table_args__ = (Index("ix_seen_tokens_expires", "expires_at"),)

    issuer_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    jti: Mapped[str] = mapped_column(String(255), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AuditEvent(Base):
    """One link of the audit chain: ``hash = SHA-256(tag ‖ prev_hash ‖ canonical JSON of the
    event)``; ``seq`` is gap-free, assigned under the ``audit_head`` row lock."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_instance", "instance_id"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    instance_id: Mapped[str | None] = mapped_column(String(255))
    lease_id: Mapped[str | None] = mapped_column(String(40))
    outcome: Mapped[str] = mapped_column(String(16), default="ok")
    reason: Mapped[str | None] = mapped_column(String(200))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The chain's head: one row (id 1), locked by every transaction that appends, so
    concurrent replicas cannot fork the chain or leave a gap."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class AuditCheckpoint(Base):
    """A signed statement of the chain's head (seq, hash, time), by a key the database
    does not hold (OpenBao transit, or a file key in development)."""

    __tablename__ = "audit_checkpoints"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    signer: Mapped[str] = mapped_column(String(32))
    key_id: Mapped[str] = mapped_column(String(255))
    signature: Mapped[str] = mapped_column(String(1024))


class Lock(Base):
    """Refuses new credentials and renewals that match, without terminating anything.
    ``kind`` is workload, issuer, role or claim (``claim`` names the claim, ``value`` its
    value). Active while ``removed_at`` is null and ``expires_at`` is null or ahead."""

    __tablename__ = "locks"
    __table_args__ = (Index("ix_locks_removed", "removed_at"),)

    lock_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    value: Mapped[str] = mapped_column(String(255))
    claim: Mapped[str | None] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(String(200))
    incident: Mapped[str | None] = mapped_column(String(128))
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    removed_by: Mapped[str | None] = mapped_column(String(128))
