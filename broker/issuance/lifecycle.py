"""How issuance ends leases in Vault: a workload's release, the leases a role's lease limit
replaces, a credential taken back because it is not handed out, and a renewal Vault
refuses because it no longer knows the lease. Every one that finds Vault not knowing a
lease decides through ``broker.leases.ending`` (ours, expired, or ``lost``): "Vault does
not know it" is never recorded as a release or a revocation by itself."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

from broker.clock import iso_z
from broker.engines import ENGINES
from broker.engines.role import RoleSettings
from broker.errors import BadRequest, BrokerError, LeaseEnded, UpstreamRejected
from broker.issuance.ledger import IssuanceLedger
from broker.leases import LeaseView
from broker.leases.ending import (
    UNKNOWN_AT_RENEWAL,
    Ending,
    LeaseEnder,
    Revoked,
    Stamp,
    sent_for_certain_not,
)
from broker.leases.states import LeaseState
from broker.vault import VaultClient

log = logging.getLogger(__name__)

ALREADY_ENDED = "already ended"  # what a release of an ended lease reports

# A release of a lease in one of these states answers as done: nothing is left to release.
_ENDED = frozenset(
    {
        LeaseState.RELEASED,
        LeaseState.REVOKED,
        LeaseState.FAILED,
        LeaseState.ABANDONED,
        LeaseState.EXPIRED,
        LeaseState.LOST,
        LeaseState.RESOLVED,
    }
)


class LeaseEnds:
    def __init__(
        self,
        *,
        roles: Mapping[str, RoleSettings],
        ledger: IssuanceLedger,
        vault: VaultClient,
        ender: LeaseEnder,
    ) -> None:
        self._roles = roles
        self._ledger = ledger
        self._vault = vault
        self._ender = ender

    async def release(self, lease: LeaseView) -> str:
        """A workload gives its lease back. Done (idempotent) once Vault confirmed it gone,
        or once Vault is found not to know it: then it is recorded as the decision says
        (``lost`` when Vault forgot it before its expiry, which the audit and the metric
        report; the workload has nothing more to do either way). Returns what became of
        it, for the request's log line: ``released``, ``lost``, ``expired`` (the state
        recorded now), or ``already ended``."""
        if lease.state in _ENDED:
            return ALREADY_ENDED  # idempotent: already gone
        if lease.state == LeaseState.ISSUING:
            raise BadRequest("the lease is still being issued", code="lease_not_active")
        role = self._roles.get(lease.role)
        if lease.external_ref is not None or (
            role is not None and not ENGINES[role.engine].revocable(role)
        ):
            # Revoking one STS session is impossible (Vault's lease revocation does nothing
            # at AWS), and denying its name would end every session of the instance on that
            # role: only termination acts, and releasing must not free a lease-limit slot.
            raise BadRequest(
                "an AWS STS session cannot be revoked on its own; it stays valid until "
                f"{iso_z(lease.expires_at) if lease.expires_at else 'its expiry'}",
                code="lease_not_revocable",
            )
        if lease.vault_lease_id is None:
            raise BadRequest(
                f"lease is {lease.state}; it holds no Vault lease, so there is nothing to release",
                code="lease_not_active",
            )
        ended = await self._ender.end_one(
            lease, actor="workload", found_by="release", ours=LeaseState.RELEASED
        )
        if ended is None:
            raise UpstreamRejected(
                "Vault still holds the lease after revoking it; retry",
                code="revocation_unconfirmed",
            )
        if isinstance(ended, Revoked):
            await self._ledger.end_lease(lease.lease_id, LeaseState.RELEASED, actor="workload")
            return LeaseState.RELEASED.value
        return ended.state.value

    async def revoke_superseded(
        self, superseded: tuple[tuple[str, str], ...]
    ) -> list[tuple[str, LeaseState | None]]:
        """Revoke leases replaced under a role's lease limit; (lease id, its final state, or
        None while not confirmed). One not confirmed stays ``revoking`` for the revocation
        worker's sweep; one Vault had forgotten is recorded as the decision says."""
        out: list[tuple[str, LeaseState | None]] = []
        for lease_id, _ in superseded:
            state: LeaseState | None = None
            try:
                lease = await self._ledger.get_lease(lease_id)
                ended = await self._ender.end_one(
                    lease, actor="lease_limit", found_by="lease_limit", ours=LeaseState.REVOKED
                )
                if isinstance(ended, Revoked):
                    await self._ledger.end_lease(lease_id, LeaseState.REVOKED, actor="lease_limit")
                    state = LeaseState.REVOKED
                elif isinstance(ended, Ending):
                    state = ended.state
            except BrokerError as exc:
                log.warning(
                    "a replaced lease is not revoked yet; the sweep retries",
                    extra={"lease_id": lease_id, "error": exc.code},
                )
            out.append((lease_id, state))
        return out

    async def take_back(self, vault_lease_id: str, *, lease_id: str | None = None) -> bool:
        """Revoke a credential that is not being handed out. False if Vault still may hold
        it (then the instance token and the reconciler cover it). ``lease_id``: its row may
        hold the Vault lease id (recorded while its instance was terminated, or a record
        whose commit is in doubt), so it is stamped (``revoke_sent_at``) before the
        revocation, or Vault's silence about it later would read as ``lost``; if the store
        cannot be written, the take-back is left to the revocation worker."""
        stamp = Stamp(None)
        if lease_id is not None:
            try:
                stamp = await self._ender.stamp([lease_id])
            except BrokerError:
                log.warning(
                    "could not record a revocation before taking a credential back; "
                    "the revocation worker and the reconciler end it",
                    extra={"lease_id": lease_id},
                )
                return False
        try:
            await self._vault.revoke_lease(vault_lease_id)
            return True
        except BrokerError as exc:
            log.warning(
                "could not revoke a credential that was not handed out",
                extra={"vault_path": vault_lease_id.rsplit("/", 1)[0], "code": exc.code},
            )
            if sent_for_certain_not(exc):
                with contextlib.suppress(BrokerError):
                    await self._ender.unstamp(stamp)
            return False

    async def renewal_refused(self, lease: LeaseView) -> None:
        """Vault refused to renew the lease. If Vault does not know it any more, it is
        recorded as the decision says and the workload is told to get a new credential
        (409 ``lease_expired`` or ``lease_lost``); otherwise returns (the refusal stands)."""
        assert lease.vault_lease_id is not None
        try:
            if await self._vault.lease_exists(lease.vault_lease_id):
                return
        except BrokerError:
            return  # Vault cannot say: the renewal's own refusal stands
        endings = await self._ender.settle_unknown(
            [lease], actor="workload", found_by="renewal", why=UNKNOWN_AT_RENEWAL
        )
        if lease.lease_id not in endings:
            # Ended (or its revocation sent) by another path meanwhile: not ours to name.
            raise BadRequest(
                "the lease is no longer active; request a new credential",
                code="lease_not_active",
            )
        state = endings[lease.lease_id].state
        if state is LeaseState.LOST:
            raise LeaseEnded(
                "Vault no longer knows this lease (it was lost before its expiry); "
                "request a new credential",
                code="lease_lost",
            )
        if state is LeaseState.EXPIRED:
            raise LeaseEnded("the lease has expired; request a new credential")
        raise BadRequest(
            f"lease is {state.value}; request a new credential", code="lease_not_active"
        )
