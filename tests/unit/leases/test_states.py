"""Lease and job state machines, against expected tables written out independently of the
module."""

from __future__ import annotations

import itertools

import pytest

from broker.leases.states import (
    FINAL_LEASE_STATES,
    JOB_TRANSITIONS,
    LEASE_TRANSITIONS,
    LIVE_LEASE_STATES,
    JobState,
    LeaseState,
    job_can_move,
    lease_can_move,
)

L = LeaseState
J = JobState
EXPECTED_LEASE_MOVES = {
    (L.ISSUING, L.ACTIVE), (L.ISSUING, L.DELIVERED), (L.ISSUING, L.FAILED),
    (L.ISSUING, L.ABANDONED),
    (L.ACTIVE, L.RELEASED), (L.ACTIVE, L.REVOKED), (L.ACTIVE, L.REVOKING),
    (L.ACTIVE, L.EXPIRED), (L.ACTIVE, L.LOST),
    (L.REVOKING, L.REVOKED), (L.REVOKING, L.EXPIRED), (L.REVOKING, L.LOST),
    (L.LOST, L.RESOLVED),  # only an operator's marker, once the credential was ended by hand
}
EXPECTED_JOB_MOVES = {
    (J.PENDING, J.RUNNING),
    (J.RUNNING, J.DONE), (J.RUNNING, J.PENDING), (J.RUNNING, J.FAILED), (J.RUNNING, J.RUNNING),
    (J.FAILED, J.PENDING),
}
LEASE_PAIRS = list(itertools.product(LeaseState, LeaseState))
JOB_PAIRS = list(itertools.product(JobState, JobState))


def test_state_values() -> None:
    assert [s.value for s in LeaseState] == ["issuing", "active", "revoking", "delivered",
                                             "failed", "released", "revoked", "abandoned",
                                             "expired", "lost", "resolved"]
    assert [s.value for s in JobState] == ["pending", "running", "done", "failed"]


@pytest.mark.parametrize(("old", "new"), LEASE_PAIRS,
                         ids=[f"{a.value}->{b.value}" for a, b in LEASE_PAIRS])
def test_lease_transitions(old: LeaseState, new: LeaseState) -> None:
    assert lease_can_move(old, new) is ((old, new) in EXPECTED_LEASE_MOVES)


@pytest.mark.parametrize(("old", "new"), JOB_PAIRS,
                         ids=[f"{a.value}->{b.value}" for a, b in JOB_PAIRS])
def test_job_transitions(old: JobState, new: JobState) -> None:
    assert job_can_move(old, new) is ((old, new) in EXPECTED_JOB_MOVES)


def test_every_state_has_a_transition_entry() -> None:
    assert set(LEASE_TRANSITIONS) == set(LeaseState)
    assert set(JOB_TRANSITIONS) == set(JobState)


def test_live_and_final_lease_states() -> None:
    assert LIVE_LEASE_STATES == {L.ISSUING, L.ACTIVE, L.REVOKING}
    assert FINAL_LEASE_STATES == {L.DELIVERED, L.FAILED, L.RELEASED, L.REVOKED, L.ABANDONED,
                                  L.EXPIRED, L.LOST, L.RESOLVED}


@pytest.mark.parametrize("state", [L.DELIVERED, L.FAILED, L.RELEASED, L.REVOKED, L.ABANDONED,
                                   L.EXPIRED, L.RESOLVED],
                         ids=lambda s: s.value)
def test_final_lease_states_have_no_exits(state: LeaseState) -> None:
    assert LEASE_TRANSITIONS[state] == frozenset()
    assert not any(lease_can_move(state, new) for new in LeaseState)


def test_lost_leads_only_to_resolved_and_nothing_live_leads_there() -> None:
    """Final for the broker: the one way out of lost is an operator's marker."""
    assert LEASE_TRANSITIONS[L.LOST] == {L.RESOLVED}
    assert [s for s in LeaseState if lease_can_move(s, L.RESOLVED)] == [L.LOST]


def test_done_job_has_no_exits() -> None:
    assert JOB_TRANSITIONS[J.DONE] == frozenset()
    assert not any(job_can_move(J.DONE, new) for new in JobState)


def test_live_lease_states_can_reach_a_final_state() -> None:
    for state in LIVE_LEASE_STATES:
        assert LEASE_TRANSITIONS[state] & FINAL_LEASE_STATES
