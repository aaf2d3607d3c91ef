"""Issuance under locks: what a lock sees of a request, and the audit of a refusal.

The match itself is ``broker.leases.locks`` (pure), run by the ledger in the transaction
that writes the ``issuing`` row (an exchange) or just before Vault is asked (a renewal).
"""

from __future__ import annotations

from typing import NoReturn, Protocol

from broker.errors import Locked
from broker.identity.model import Identity
from broker.leases.locks import LockSubject


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


def lock_subject(identity: Identity, role: str) -> LockSubject:
    return LockSubject(
        issuer=identity.issuer_name, workload=identity.workload, role=role, claims=identity.claims
    )


async def audit_locked(
    refusals: RefusalAudit | None,
    identity: Identity,
    role: str,
    exc: Locked,
    request: str,
    **more: str,
) -> None:
    """A lock refused the request: ``credential.refused`` with outcome ``locked``, bounded
    like every refusal; nothing else changes (a lock never terminates anything). The
    refusal's log line is the HTTP layer's, with the lock's id."""
    if refusals is not None:
        await refusals.refused(
            f"workload:{identity.issuer_name}",
            "credential.refused",
            outcome="locked",
            lock_id=exc.lock_id,
            request=request,
            instance_id=identity.instance_id,
            workload=identity.workload,
            role=role,
            **more,
        )


async def refuse_renewal(
    refusals: RefusalAudit | None, identity: Identity, role: str, lock_id: str, lease_id: str
) -> NoReturn:
    """A lock created while Vault renewed the lease: the renewal is recorded (Vault holds
    it) and refused to the caller, as it would have been a moment later; audited."""
    refused = Locked(lock_id)
    await audit_locked(refusals, identity, role, refused, "renew", lease_id=lease_id)
    raise refused
