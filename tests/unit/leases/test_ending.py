"""The decision for a lease Vault does not know, over every combination of what decides
it: a revocation of ours sent, past expiry (with the margin), and a direct check's answer.
"Vault does not know it" alone is never a revocation."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from broker.leases.ending import EXPIRY_MARGIN, Ending, decide, past_expiry, worth_checking
from broker.leases.states import LeaseState
from broker.leases.views import LeaseView

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
L = LeaseState


def _lease(*, sent: bool, expires_in: timedelta | None) -> LeaseView:
    return LeaseView(
        "l-1", "i-1", "w", "db", "database_login", "active", True, NOW - timedelta(hours=1),
        NOW - timedelta(hours=1), None if expires_in is None else NOW + expires_in, None,
        "database/creds/app/abc", "acc", None, "database/creds/app", {"username": "v-x"},
        NOW - timedelta(seconds=30) if sent else None,
    )


EXPIRIES = {
    "no-expiry": None,
    "far-ahead": timedelta(hours=1),
    "just-outside-margin": EXPIRY_MARGIN + timedelta(seconds=1),
    "at-margin": EXPIRY_MARGIN,
    "inside-margin": EXPIRY_MARGIN - timedelta(seconds=1),
    "now": timedelta(0),
    "past": -timedelta(minutes=5),
}
PAST = {"at-margin", "inside-margin", "now", "past"}
CASES = list(itertools.product([False, True], EXPIRIES, [None, False, True],
                               [L.REVOKED, L.RELEASED]))


def _expected(sent: bool, expiry: str, confirmed: bool | None, ours: LeaseState) -> Ending:
    if sent:
        return Ending(ours)
    if expiry in PAST:
        return Ending(L.EXPIRED)
    if confirmed is True:
        return Ending(ours, confirmed_by="crl")
    return Ending(L.LOST)


@pytest.mark.parametrize(("sent", "expiry", "confirmed", "ours"), CASES,
                         ids=[f"sent={a}-{b}-check={c}-{d.value}" for a, b, c, d in CASES])
def test_decide(sent: bool, expiry: str, confirmed: bool | None, ours: LeaseState) -> None:
    lease = _lease(sent=sent, expires_in=EXPIRIES[expiry])
    got = decide(lease, NOW, confirmed=confirmed, by="crl", ours=ours)
    assert got == _expected(sent, expiry, confirmed, ours)
    assert got.state is not L.REVOKED or sent or confirmed is True  # never a false revoked
    assert past_expiry(lease, NOW) is (expiry in PAST)
    assert worth_checking(lease, NOW) is (not sent and expiry not in PAST)


def test_default_is_revoked_and_no_check_means_lost() -> None:
    assert decide(_lease(sent=True, expires_in=None), NOW) == Ending(L.REVOKED)
    assert decide(_lease(sent=False, expires_in=timedelta(hours=1)), NOW) == Ending(L.LOST)
