"""The agent's decisions, case by case: adopt or not, renew or issue afresh and when, what
each broker answer means, backoff, the grace before giving back a replaced lease, and
readiness. A property test follows the plan against the broker's own renewal rule for
any TTL and max TTL: every refresh comes before the expiry, and no lease is renewed in a
storm as it nears its max TTL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.agent import plan
from broker.agent.plan import (
    CredentialStatus,
    Due,
    Outcome,
    Release,
    Status,
    Step,
)
from broker.agent.spec import CredentialSpec
from broker.agent.state import Entry, Lease

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
SPEC = CredentialSpec("db", "orders")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def lease(ttl: float = 600, *, seen: float = 0, renewable: bool = True, leased: bool = True,
          near_max: bool = False) -> Lease:
    return Lease("l-" + "0" * 32, leased, renewable, T0, at(seen + ttl), at(seen),
                 near_max=near_max)


def entry(spec: CredentialSpec = SPEC, **kw: object) -> Entry:
    return Entry(spec.role, spec.digest(), ("db",), lease(**kw))  # type: ignore[arg-type]


ADOPTION = [
    (None, True, 0, False, "nothing was issued for it before", "no-entry"),
    (entry(CredentialSpec("db", "other")), True, 0, False,
     "its settings changed since it was issued", "role-changed"),
    (entry(CredentialSpec("db", "orders", "pgpass")), True, 0, False,
     "its settings changed since it was issued", "format-changed"),
    (entry(), False, 0, False, "its files are missing", "files-missing"),
    (entry(), True, 600, False, "its lease has ended or is about to", "expired-now"),
    (entry(), True, 700, False, "its lease has ended or is about to", "expired-long-ago"),
    (entry(), True, 598.5, False, "its lease has ended or is about to", "within-margin"),
    (entry(), True, 598, True, "adopted: issued by an earlier run", "exactly-margin"),
    (entry(), True, 10, True, "adopted: issued by an earlier run", "fresh"),
]


@pytest.mark.parametrize(("e", "present", "now", "adopted", "reason"),
                         [a[:5] for a in ADOPTION], ids=[a[5] for a in ADOPTION])
def test_adoption(e: Entry | None, present: bool, now: float, adopted: bool,
                  reason: str) -> None:
    assert plan.adoption(e, SPEC, present, at(now)) == plan.Adoption(adopted, reason)


def test_a_changed_command_or_signal_still_adopts() -> None:
    hooked = CredentialSpec("db", "orders", command=("x",))
    assert plan.adoption(entry(), hooked, True, at(1)).adopted


NEXT = [
    (lease(600), Due(Step.RENEW, at(400)), "renewable-at-two-thirds"),
    (lease(600, seen=100), Due(Step.RENEW, at(500)), "from-when-seen"),
    (lease(600, renewable=False), Due(Step.ISSUE, at(400)), "not-renewable-issue-afresh"),
    (lease(600, leased=False), Due(Step.ISSUE, at(400)), "no-lease-issue-afresh"),
    (lease(600, near_max=True), Due(Step.ISSUE, at(400)), "near-max-issue-afresh"),
    (lease(1.5), Due(Step.RENEW, at(1)), "short-ttl"),
    (lease(0), Due(Step.RENEW, at(1)), "expires-as-seen-one-second"),
    (lease(-5), Due(Step.RENEW, at(1)), "already-expired-one-second"),
    (lease(3), Due(Step.RENEW, at(2)), "three-seconds"),
]


@pytest.mark.parametrize(("held", "due"), [n[:2] for n in NEXT], ids=[n[2] for n in NEXT])
def test_next_due(held: Lease, due: Due) -> None:
    assert plan.next_due(held) == due


@pytest.mark.parametrize(("held", "due"), [
    (lease(600), Due(Step.RENEW, at(50))),
    (lease(600, renewable=False), Due(Step.ISSUE, at(400))),
    (lease(600, near_max=True), Due(Step.ISSUE, at(400))),
], ids=["renewable-renewed-at-once", "not-renewable-keeps-schedule", "near-max-keeps-schedule"])
def test_after_adoption(held: Lease, due: Due) -> None:
    assert plan.after_adoption(held, at(50)) == due


RENEWED = [
    # now, new expiry, broker's near_max_ttl, expected near_max
    (400, 1000, False, False, "extended"),
    (400, 1000, True, True, "broker-says-near-max"),
    (400, 650, False, True, "capped-stalled"),
    (400, 600, False, True, "not-moved"),
    (400, 800, False, False, "moved-exactly-half-elapsed"),
    (400, 799, False, True, "moved-just-under-half-elapsed"),
    (0, 600, False, False, "renewed-at-once-after-adoption"),
    (2, 602, False, False, "renewed-soon-after-adoption"),
]


@pytest.mark.parametrize(("now", "new", "broker_near", "near"), [r[:4] for r in RENEWED],
                         ids=[r[4] for r in RENEWED])
def test_renewed(now: float, new: float, broker_near: bool, near: bool) -> None:
    out = plan.renewed(lease(600), now=at(now), expires_at=at(new), renewable=True,
                       max_expires_at=at(3600), near_max_ttl=broker_near)
    assert out == Lease("l-" + "0" * 32, True, True, T0, at(new), at(now), at(3600), near)


def test_renewed_may_become_not_renewable() -> None:
    out = plan.renewed(lease(600), now=at(400), expires_at=at(1000), renewable=False,
                       max_expires_at=None, near_max_ttl=False)
    assert plan.next_due(out).step is Step.ISSUE


ISSUE_ANSWERS = [
    (None, None, Outcome.UNAVAILABLE, "no-answer"),
    (500, "internal_error", Outcome.UNAVAILABLE, "500"),
    (502, "vault_permission_denied", Outcome.UNAVAILABLE, "502"),
    (503, "vault_unavailable", Outcome.UNAVAILABLE, "503"),
    (429, None, Outcome.UNAVAILABLE, "429"),
    (400, "unknown_parameter", Outcome.OTHER_KEY, "unknown-parameter"),
    (400, "invalid_parameter", Outcome.REFUSED, "invalid-parameter"),
    (400, "invalid_ttl", Outcome.REFUSED, "invalid-ttl"),
    (401, "token_expired", Outcome.REFUSED, "401"),
    (403, "role_not_permitted", Outcome.REFUSED, "403"),
    (409, "instance_terminated", Outcome.REFUSED, "terminated"),
    (409, "lease_limit_reached", Outcome.REFUSED, "limit"),
    (404, "not_found", Outcome.REFUSED, "404"),
]


@pytest.mark.parametrize(("status", "code", "outcome"), [a[:3] for a in ISSUE_ANSWERS],
                         ids=[a[3] for a in ISSUE_ANSWERS])
def test_classify_issue(status: int | None, code: str | None, outcome: Outcome) -> None:
    assert plan.classify_issue(status, code) is outcome


RENEW_ANSWERS = [
    (None, None, Outcome.UNAVAILABLE, "no-answer"),
    (503, "store_unavailable", Outcome.UNAVAILABLE, "503"),
    (502, "vault_no_lease", Outcome.UNAVAILABLE, "502"),
    (400, "lease_at_max_ttl", Outcome.REISSUE, "at-max"),
    (400, "lease_not_renewable", Outcome.REISSUE, "not-renewable"),
    (400, "lease_not_active", Outcome.REISSUE, "not-active"),
    (404, "lease_not_found", Outcome.REISSUE, "not-found"),
    (404, "not_found", Outcome.REFUSED, "route-not-found"),
    (400, "invalid_ttl", Outcome.REFUSED, "other-400"),
    (401, "token_expired", Outcome.REFUSED, "401"),
    (403, "role_not_permitted", Outcome.REFUSED, "role-withdrawn"),
    (409, "instance_terminated", Outcome.REFUSED, "terminated"),
    (409, "lease_expired", Outcome.REISSUE, "vault-forgot-expired"),
    (409, "lease_lost", Outcome.REISSUE, "vault-forgot-lost"),
    (400, "lease_lost", Outcome.REFUSED, "lost-code-not-409"),
]


@pytest.mark.parametrize(("status", "code", "outcome"), [a[:3] for a in RENEW_ANSWERS],
                         ids=[a[3] for a in RENEW_ANSWERS])
def test_classify_renew(status: int | None, code: str | None, outcome: Outcome) -> None:
    assert plan.classify_renew(status, code) is outcome


@pytest.mark.parametrize(("status", "code", "outcome"), [
    # Vault no longer knows a lease past its expiry: the broker answers 502. A retry can
    # never bring it back; the soak saw a pod's login dead for 11 s this way.
    (502, "vault_invalid_request", Outcome.REISSUE),
    (None, None, Outcome.REISSUE),
    (503, "vault_unavailable", Outcome.REISSUE),
    (400, "lease_not_active", Outcome.REISSUE),
    (403, "role_not_permitted", Outcome.REFUSED),
    (409, "instance_terminated", Outcome.REFUSED),
    (401, "token_expired", Outcome.REFUSED),
], ids=["502-after-expiry", "no-answer", "503", "ended", "403", "409", "401"])
def test_a_failed_renewal_of_an_expired_lease_issues_afresh(
        status: int | None, code: str | None, outcome: Outcome) -> None:
    assert plan.classify_renew(status, code, expired=True) is outcome
    if outcome is Outcome.REISSUE and code not in ("lease_not_active",):
        assert plan.classify_renew(status, code, expired=False) is Outcome.UNAVAILABLE


RELEASE_ANSWERS = [
    (204, None, Release.DONE, "204"),
    (404, "lease_not_found", Release.DONE, "gone"),
    (400, "lease_not_active", Release.DONE, "already-ended"),
    (None, None, Release.RETRY, "no-answer"),
    (503, "vault_unavailable", Release.RETRY, "503"),
    (502, "revocation_unconfirmed", Release.RETRY, "unconfirmed"),
    (401, "token_expired", Release.ABANDON, "401"),
    (409, "instance_terminated", Release.ABANDON, "terminated"),
]


@pytest.mark.parametrize(("status", "code", "verdict"), [a[:3] for a in RELEASE_ANSWERS],
                         ids=[a[3] for a in RELEASE_ANSWERS])
def test_classify_release(status: int | None, code: str | None, verdict: Release) -> None:
    assert plan.classify_release(status, code) is verdict


@pytest.mark.parametrize(("outcome", "attempt", "jitter", "seconds"), [
    (Outcome.UNAVAILABLE, 1, 0.0, 0.5), (Outcome.UNAVAILABLE, 1, 1.0, 1.0),
    (Outcome.UNAVAILABLE, 4, 1.0, 8.0), (Outcome.UNAVAILABLE, 50, 1.0, 30.0),
    (Outcome.UNAVAILABLE, 50, 0.0, 15.0), (Outcome.REFUSED, 1, 1.0, 5.0),
    (Outcome.REFUSED, 3, 1.0, 20.0), (Outcome.REFUSED, 50, 1.0, 300.0),
], ids=["first", "first-jitter", "fourth", "capped", "capped-no-jitter", "refused-first",
        "refused-third", "refused-capped"])
def test_retry_in(outcome: Outcome, attempt: int, jitter: float, seconds: float) -> None:
    assert plan.retry_in(outcome, attempt, jitter) == timedelta(seconds=seconds)


@pytest.mark.parametrize(("ttl", "now", "release"), [
    (600, 400, 430), (600, 590, 595), (600, 600, 600), (600, 700, 700),
], ids=["grace", "half-of-what-is-left", "at-expiry", "after-expiry"])
def test_release_at(ttl: float, now: float, release: float) -> None:
    assert plan.release_at(lease(ttl), at(now)) == at(release)


@pytest.mark.parametrize(("statuses", "now", "ready"), [
    ({}, 0, False),
    ({"a": CredentialStatus(Status.READY, at(10))}, 0, True),
    ({"a": CredentialStatus(Status.READY, at(10))}, 10, False),
    ({"a": CredentialStatus(Status.RETRYING, at(10), "vault_unavailable")}, 0, True),
    ({"a": CredentialStatus(Status.RETRYING, at(10))}, 11, False),
    ({"a": CredentialStatus(Status.READY, at(10)), "b": CredentialStatus(Status.PENDING)}, 0,
     False),
    ({"a": CredentialStatus(Status.READY, at(10)),
      "b": CredentialStatus(Status.REFUSED, None, "role_not_permitted")}, 0, False),
    ({"a": CredentialStatus(Status.REFUSED, at(10), "token_expired")}, 0, False),
], ids=["none", "ready", "expired", "retrying-still-works", "retrying-expired", "one-pending",
        "one-refused", "refused-with-files"])
def test_readiness(statuses: dict[str, CredentialStatus], now: float, ready: bool) -> None:
    assert plan.readiness(statuses, at(now)) is ready


def test_status_at_shows_expiry() -> None:
    s = CredentialStatus(Status.READY, at(10))
    assert (s.at(at(9)), s.at(at(10))) == (Status.READY, Status.EXPIRED)
    assert CredentialStatus(Status.PENDING).at(at(99)) is Status.PENDING


class BrokerRule:
    """The broker's renewal rule (``issuance.service.renew``), to follow the plan
    against: never past ``cap`` from issue, ``near_max_ttl`` within min(cap/10, 300)."""

    def __init__(self, ttl: int, cap: int) -> None:
        self.ttl, self.cap = ttl, cap

    def renew(self, held: Lease, now: datetime) -> Lease | None:
        max_expires = held.issued_at + timedelta(seconds=self.cap)
        room = (max_expires - now).total_seconds()
        if room <= 0:
            return None  # lease_at_max_ttl
        expires = now + timedelta(seconds=min(self.ttl, int(room)))
        near = (max_expires - expires) < timedelta(seconds=min(self.cap / 10, 300))
        return plan.renewed(held, now=now, expires_at=expires, renewable=True,
                            max_expires_at=max_expires, near_max_ttl=near)


@settings(max_examples=300, deadline=None)
@given(ttl=st.integers(3, 7200), extra=st.integers(0, 20 * 3600))
def test_following_the_plan_refreshes_before_expiry_without_a_storm(ttl: int,
                                                                    extra: int) -> None:
    cap = ttl + extra
    rule = BrokerRule(ttl, cap)
    held = Lease("l-" + "1" * 32, True, True, T0, at(ttl), T0)
    renewals, most_renewals, shortest_life = 0, 0, timedelta.max
    horizon = at(3 * cap + 3 * ttl)
    while True:
        due = plan.next_due(held)
        if due.at > horizon:
            break
        # Every refresh is due while the credential still works, with a third of what it
        # had left to spare (for a slow or unavailable broker).
        assert due.at < held.expires_at
        assert held.expires_at - due.at >= (held.expires_at - held.seen_at) / 3 - timedelta(
            seconds=0.001)
        after = rule.renew(held, due.at) if due.step is Step.RENEW else None
        if after is not None:
            renewals += 1
            held = after
            continue
        # Issued afresh: before the max TTL (the broker never had to refuse a renewal).
        assert due.step is Step.ISSUE
        assert due.at < held.issued_at + timedelta(seconds=cap)
        shortest_life = min(shortest_life, due.at - held.issued_at)
        most_renewals, renewals = max(most_renewals, renewals), 0
        held = Lease("l-" + "1" * 32, True, True, due.at, due.at + timedelta(seconds=ttl), due.at)
    # No storm near the max TTL: about one renewal per two thirds of a TTL, and a lease
    # lives at least two thirds of its TTL before it is replaced.
    assert most_renewals <= 1.5 * cap / ttl + 2
    if shortest_life != timedelta.max:
        assert shortest_life >= timedelta(seconds=ttl * 2 / 3)
