"""State machines of leases, instances and revocation jobs. Pure."""

from __future__ import annotations

from enum import StrEnum


class LeaseState(StrEnum):
    ISSUING = "issuing"  # row written, Vault asked (or about to be)
    ACTIVE = "active"  # Vault issued it and the broker recorded it
    # Chosen for revocation while still live (replaced under the role's lease limit);
    # revoked by the request that chose it, or by the sweep if that request died.
    REVOKING = "revoking"
    # Handed out without a Vault lease (a static kv secret): nothing to renew or revoke.
    DELIVERED = "delivered"
    FAILED = "failed"  # Vault refused or failed: nothing was issued
    RELEASED = "released"  # the workload returned it early; Vault confirmed it gone
    REVOKED = "revoked"  # revoked by termination; Vault confirmed it gone
    ABANDONED = "abandoned"  # stuck in issuing past the bound; covered by the token revocation
    # Past its expiry, and Vault confirmed it gone (the reconciler's expiry pass).
    EXPIRED = "expired"
    # Vault no longer knew the lease before the broker revoked it, and before its expiry
    # (Vault restored from an older snapshot, storage replaced, a mount re-enabled): the
    # credential may still work, and only an operator can end it (engine, Vault path and
    # ``credential_ref`` say where). Final for the broker; never taken for ``revoked``.
    # Only an operator moves it on, to ``resolved``.
    LOST = "lost"
    # A lost lease an operator said they ended by hand (``brokerctl leases resolve``):
    # who, when, why and the incident are recorded on it and in its audit event. No longer
    # a problem to list or count; the broker itself never sets it.
    RESOLVED = "resolved"


class InstanceState(StrEnum):
    ACTIVE = "active"
    TERMINATING = "terminating"
    TERMINATED = "terminated"


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # gave up retrying on its own; visible, retried when asked again


LEASE_TRANSITIONS: dict[LeaseState, frozenset[LeaseState]] = {
    LeaseState.ISSUING: frozenset(
        {LeaseState.ACTIVE, LeaseState.DELIVERED, LeaseState.FAILED, LeaseState.ABANDONED}
    ),
    LeaseState.ACTIVE: frozenset(
        {
            LeaseState.RELEASED,
            LeaseState.REVOKED,
            LeaseState.REVOKING,
            LeaseState.EXPIRED,
            LeaseState.LOST,
        }
    ),
    LeaseState.REVOKING: frozenset({LeaseState.REVOKED, LeaseState.EXPIRED, LeaseState.LOST}),
    LeaseState.DELIVERED: frozenset(),
    LeaseState.FAILED: frozenset(),
    LeaseState.RELEASED: frozenset(),
    LeaseState.REVOKED: frozenset(),
    LeaseState.ABANDONED: frozenset(),
    LeaseState.EXPIRED: frozenset(),
    LeaseState.LOST: frozenset({LeaseState.RESOLVED}),
    LeaseState.RESOLVED: frozenset(),
}

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.RUNNING}),
    JobState.RUNNING: frozenset(
        {JobState.DONE, JobState.PENDING, JobState.FAILED, JobState.RUNNING}
    ),  # RUNNING→RUNNING: reclaimed after a crash
    JobState.FAILED: frozenset({JobState.PENDING}),
    JobState.DONE: frozenset(),
}

# Leases that may still hold a live credential in Vault.
LIVE_LEASE_STATES = frozenset({LeaseState.ISSUING, LeaseState.ACTIVE, LeaseState.REVOKING})
# Leases that count against a role's per-instance limit (a revoking one is on its way out).
COUNTED_LEASE_STATES = frozenset({LeaseState.ISSUING, LeaseState.ACTIVE})
FINAL_LEASE_STATES = frozenset(LeaseState) - LIVE_LEASE_STATES


def lease_can_move(old: LeaseState, new: LeaseState) -> bool:
    return new in LEASE_TRANSITIONS[old]


def job_can_move(old: JobState, new: JobState) -> bool:
    return new in JOB_TRANSITIONS[old]
