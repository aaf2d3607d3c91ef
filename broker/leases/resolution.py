"""An operator's "handled" marker on a lost lease (``brokerctl leases resolve``): what
marking a lease resolved does, by its state. Pure; the SQL that records it with its audit
event is ``broker.leases.sql.ending.resolve_lost``.

A ``lost`` lease (Vault forgot it; its credential may still work) moves to ``resolved``
once an operator says they ended the credential by hand, with who, when, why and the
incident recorded on the lease. Marking one already resolved changes nothing (the first
marker stays the recorded one). Any other lease is refused: a live one is ended by
revoking its instance, and one that ended otherwise needs no marker.
"""

from __future__ import annotations

from enum import StrEnum

from broker.leases.states import LIVE_LEASE_STATES, LeaseState, lease_can_move


class Resolving(StrEnum):
    RESOLVE = "resolve"  # lost: record the marker
    ALREADY = "already"  # resolved before: answer as it is, record nothing
    REFUSE = "refuse"  # any other state: 409 ``lease_not_lost``


def resolving(state: LeaseState) -> Resolving:
    """What marking a lease in ``state`` resolved does."""
    if lease_can_move(state, LeaseState.RESOLVED):
        return Resolving.RESOLVE
    if state is LeaseState.RESOLVED:
        return Resolving.ALREADY
    return Resolving.REFUSE


def not_lost_message(state: LeaseState) -> str:
    """Why a lease in ``state`` (not lost, not resolved) cannot be marked resolved, and
    what to do instead."""
    if state in LIVE_LEASE_STATES:
        return (
            f"the lease is {state.value}, not lost: only a lost lease is marked resolved; "
            "end a live one by revoking its instance (brokerctl revoke --instance ID)"
        )
    return (
        f"the lease is {state.value}, not lost: only a lost lease is marked resolved; "
        "this one ended without needing a hand"
    )


__all__ = ["Resolving", "not_lost_message", "resolving"]
