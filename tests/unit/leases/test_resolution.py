"""Marking a lease resolved (an operator ended a lost lease's credential by hand), for
every lease state, against a table written out independently of the module."""

from __future__ import annotations

import pytest

from broker.leases.resolution import Resolving, not_lost_message, resolving
from broker.leases.states import LeaseState

L = LeaseState
EXPECTED = {
    L.ISSUING: Resolving.REFUSE,
    L.ACTIVE: Resolving.REFUSE,
    L.REVOKING: Resolving.REFUSE,
    L.DELIVERED: Resolving.REFUSE,
    L.FAILED: Resolving.REFUSE,
    L.RELEASED: Resolving.REFUSE,
    L.REVOKED: Resolving.REFUSE,
    L.ABANDONED: Resolving.REFUSE,
    L.EXPIRED: Resolving.REFUSE,
    L.LOST: Resolving.RESOLVE,
    L.RESOLVED: Resolving.ALREADY,
}


def test_the_table_covers_every_state() -> None:
    assert set(EXPECTED) == set(LeaseState)


@pytest.mark.parametrize("state", list(LeaseState), ids=lambda s: s.value)
def test_what_marking_a_lease_resolved_does(state: LeaseState) -> None:
    assert resolving(state) is EXPECTED[state]


@pytest.mark.parametrize("state", [L.ISSUING, L.ACTIVE, L.REVOKING], ids=lambda s: s.value)
def test_a_live_lease_is_refused_pointing_at_revocation(state: LeaseState) -> None:
    assert not_lost_message(state) == (
        f"the lease is {state.value}, not lost: only a lost lease is marked resolved; "
        "end a live one by revoking its instance (brokerctl revoke --instance ID)"
    )


@pytest.mark.parametrize(
    "state",
    [L.DELIVERED, L.FAILED, L.RELEASED, L.REVOKED, L.ABANDONED, L.EXPIRED],
    ids=lambda s: s.value,
)
def test_an_ended_lease_is_refused_as_needing_no_marker(state: LeaseState) -> None:
    assert not_lost_message(state) == (
        f"the lease is {state.value}, not lost: only a lost lease is marked resolved; "
        "this one ended without needing a hand"
    )
