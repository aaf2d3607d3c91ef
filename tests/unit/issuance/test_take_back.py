"""Taking back a credential whose row may hold its Vault lease: stamped before the
revocation; not sent at all when the stamp cannot be written (the revocation worker ends
it); the stamp taken back when Vault certainly did not revoke."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from broker.errors import BrokerError, StoreUnavailable, UpstreamRejected, UpstreamUnavailable
from broker.issuance.lifecycle import LeaseEnds
from broker.leases.ending import LeaseEnder

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


class Clock:
    def now(self) -> datetime:
        return NOW


class World:
    """Vault and the ledger, one log."""

    def __init__(self, *, revoke_fails: BrokerError | None = None,
                 store_down: bool = False) -> None:
        self.log: list[str] = []
        self.stamps: dict[str, datetime] = {}
        self.revoke_fails, self.store_down = revoke_fails, store_down

    async def revoke_lease(self, lease_id: str) -> None:
        self.log.append("revoke")
        if self.revoke_fails is not None:
            raise self.revoke_fails

    async def lease_exists(self, lease_id: str) -> bool:
        return False

    async def mark_revoke_sent(self, lease_ids, at):
        if self.store_down:
            raise StoreUnavailable("the lease store is unreachable")
        self.log.append("stamp")
        for lid in lease_ids:
            self.stamps.setdefault(lid, at)
        return len(lease_ids)

    async def clear_revoke_sent(self, lease_ids, at):
        self.log.append("unstamp")
        for lid in lease_ids:
            if self.stamps.get(lid) == at:
                del self.stamps[lid]
        return 1

    async def end_decided(self, *a, **kw):
        return True


def _ends(world: World) -> LeaseEnds:
    ender = LeaseEnder(world, world, Clock())  # type: ignore[arg-type]
    return LeaseEnds(roles={}, ledger=None, vault=world, ender=ender)  # type: ignore[arg-type]


async def test_a_recorded_row_is_stamped_before_its_credential_is_taken_back() -> None:
    world = World()
    assert await _ends(world).take_back("db/creds/r/x", lease_id="l-1") is True
    assert world.log == ["stamp", "revoke"] and world.stamps == {"l-1": NOW}


async def test_no_row_to_stamp_revokes_straight_away() -> None:
    world = World()
    assert await _ends(world).take_back("db/creds/r/x") is True
    assert world.log == ["revoke"]


async def test_a_stamp_that_cannot_be_written_leaves_the_take_back_to_the_worker() -> None:
    world = World(store_down=True)
    assert await _ends(world).take_back("db/creds/r/x", lease_id="l-1") is False
    assert world.log == []


@pytest.mark.parametrize(("error", "kept"), [
    (UpstreamRejected("refused", code="vault_invalid_request"), False),
    (UpstreamUnavailable("connection refused", outcome_unknown=False), False),
    (UpstreamUnavailable("timed out", outcome_unknown=True), True),
])
async def test_a_failed_take_back_keeps_its_stamp_only_if_it_may_have_been_done(
        error: BrokerError, kept: bool) -> None:
    world = World(revoke_fails=error)
    assert await _ends(world).take_back("db/creds/r/x", lease_id="l-1") is False
    assert (world.stamps == {"l-1": NOW}) is kept
