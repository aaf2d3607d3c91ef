"""STS sessions, which no one can revoke: the broker denies them in IAM (``broker.aws``)
once no request of their instance is in flight, and only then records them revoked."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from typing import Protocol

from broker.aws import SessionRef
from broker.errors import UpstreamRejected
from broker.leases import LeaseState, LeaseView

# A session that expired this long ago (by the broker's clock, against AWS's stamp) needs
# no deny: AWS refuses it already.
EXPIRED_MARGIN = timedelta(minutes=5)


class SessionRevoker(Protocol):
    """Stands in for revoking STS sessions: a deny in IAM, confirmed before returning."""

    async def deny_sessions(self, ref: SessionRef, *, issued_before: datetime) -> None: ...


class SessionLedger(Protocol):
    """What the deny records (``RevocationJobRecords``)."""

    async def mark_leases_ended(
        self, lease_ids: Sequence[str], state: LeaseState, *, actor: str
    ) -> int: ...

    def exclusive(self, key: str, *, timeout_s: int = 30) -> AbstractAsyncContextManager[None]: ...


async def deny_sessions(
    leases: list[LeaseView],
    *,
    cloud: SessionRevoker | None,
    ledger: SessionLedger,
    now: datetime,
    actor: str,
) -> None:
    """Deny in IAM the STS sessions these leases stand for, then mark the live ones
    ``revoked``. Runs only when no request of the instance is in flight, so every
    session was issued before now. A session known to have expired is left alone."""
    by_ref: dict[SessionRef, list[LeaseView]] = {}
    for lease in leases:
        assert lease.external_ref is not None
        try:
            ref = SessionRef.from_record(lease.external_ref)
        except ValueError:
            raise UpstreamRejected(
                f"lease {lease.lease_id} names an external reference this broker cannot act on",
                code="external_ref_unknown",
            ) from None
        by_ref.setdefault(ref, []).append(lease)
    for ref, group in by_ref.items():
        expired = all(
            lease.state != LeaseState.ISSUING
            and lease.expires_at is not None
            and lease.expires_at + EXPIRED_MARGIN < now
            for lease in group
        )
        if expired:
            continue
        if cloud is None:
            raise UpstreamRejected(
                "leases of this instance are STS sessions, and the broker has no aws "
                "section to deny them with",
                code="cloud_not_configured",
            )
        async with ledger.exclusive(f"aws-deny:{ref.role_arn}"):
            await cloud.deny_sessions(ref, issued_before=now)
    await ledger.mark_leases_ended(
        [lease.lease_id for lease in leases if lease.state != LeaseState.ISSUING],
        LeaseState.REVOKED,
        actor=actor,
    )
