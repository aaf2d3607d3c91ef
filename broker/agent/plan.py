"""The agent's decisions, as pure functions over plain values: whether to adopt what an
earlier run issued, when to renew and when to issue afresh, what a broker answer means,
how long to wait before trying again, when to give back a replaced lease, and whether
the agent is ready. ``broker.agent.agent`` does the I/O these decide.

Timing. A credential is refreshed two thirds of the way from the moment its expiry was
learned (issue or renewal) to that expiry, leaving a third of its life to absorb a slow
or unavailable broker. A renewable lease is renewed; one that cannot be (not renewable,
or at its maximum TTL: the broker's ``near_max_ttl``, or a renewal that no longer moves
the expiry) is issued afresh at that point, the new credential written and announced,
and the old lease given back after a grace period (at most half of what it has left).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from broker.agent.spec import CredentialSpec
from broker.agent.state import Entry, Lease
from broker.backoff import retry_delay

REFRESH_FRACTION = 2 / 3
# The wait before refreshing a lease that has already expired (a clock jump, a long
# outage): never a tight loop.
MIN_DELAY = timedelta(seconds=1)
# A lease with less than this left is not adopted: it could expire before it is renewed.
ADOPT_MARGIN = timedelta(seconds=2)
RELEASE_GRACE = timedelta(seconds=30)


class Step(enum.StrEnum):
    ISSUE = "issue"
    RENEW = "renew"


@dataclass(frozen=True)
class Due:
    step: Step
    at: datetime


@dataclass(frozen=True)
class Adoption:
    adopted: bool
    reason: str


def adoption(
    entry: Entry | None, spec: CredentialSpec, files_present: bool, now: datetime
) -> Adoption:
    """Whether a credential an earlier run wrote is kept (and renewed) rather than issued
    again: the same settings, its files still there, its lease not about to end."""
    if entry is None:
        return Adoption(False, "nothing was issued for it before")
    if entry.role != spec.role or entry.digest != spec.digest():
        return Adoption(False, "its settings changed since it was issued")
    if not files_present:
        return Adoption(False, "its files are missing")
    if entry.lease.expires_at - now < ADOPT_MARGIN:
        return Adoption(False, "its lease has ended or is about to")
    return Adoption(True, "adopted: issued by an earlier run")


def refresh_at(lease: Lease) -> datetime:
    span = lease.expires_at - lease.seen_at
    if span <= timedelta(0):
        return lease.seen_at + MIN_DELAY
    return lease.seen_at + span * REFRESH_FRACTION


def renews(lease: Lease) -> bool:
    return lease.leased and lease.renewable and not lease.near_max


def next_due(lease: Lease) -> Due:
    """What to do next for a credential held under ``lease``, and when."""
    return Due(Step.RENEW if renews(lease) else Step.ISSUE, refresh_at(lease))


def after_adoption(lease: Lease, now: datetime) -> Due:
    """An adopted lease is renewed at once (which also proves the broker still has it);
    one that does not renew keeps its schedule."""
    return Due(Step.RENEW, now) if renews(lease) else next_due(lease)


def renewed(
    lease: Lease,
    *,
    now: datetime,
    expires_at: datetime,
    renewable: bool,
    max_expires_at: datetime | None,
    near_max_ttl: bool,
) -> Lease:
    """The lease after a renewal answer. A renewal that moved the expiry by less than half
    the time since it was last learned has hit a cap (the role's, or Vault's own): it is
    treated as ``near_max`` so that the credential is issued afresh instead of renewed
    ever more often."""
    stalled = (expires_at - lease.expires_at) < (now - lease.seen_at) / 2
    return replace(
        lease,
        expires_at=expires_at,
        renewable=renewable,
        seen_at=now,
        max_expires_at=max_expires_at,
        near_max=near_max_ttl or stalled,
    )


class Outcome(enum.StrEnum):
    """What a failed broker call means for the agent."""

    UNAVAILABLE = "unavailable"  # try again with backoff; the files already written stay
    REFUSED = "refused"  # the broker said no: readiness fails, try again much later
    REISSUE = "reissue"  # the lease cannot be renewed any more: issue afresh
    OTHER_KEY = "other_key"  # the role does not take this key parameter: try the next one


_LEASE_ENDED = frozenset(
    {"lease_at_max_ttl", "lease_not_renewable", "lease_not_active", "lease_not_found"}
)
# 409: Vault no longer knows the lease (expired, or forgotten: ``lost``); only a new one helps.
_LEASE_GONE = frozenset({"lease_expired", "lease_lost"})


def _unavailable(status: int | None) -> bool:
    # No answer (connection refused, timeout) or a server-side failure (including 502:
    # Vault said no to the broker, which the broker's operator must fix, not this pod).
    return status is None or status >= 500 or status == 429


def classify_issue(status: int | None, code: str | None) -> Outcome:
    if _unavailable(status):
        return Outcome.UNAVAILABLE
    if status == 400 and code == "unknown_parameter":
        return Outcome.OTHER_KEY
    return Outcome.REFUSED


def classify_renew(status: int | None, code: str | None, *, expired: bool = False) -> Outcome:
    """``expired``: the lease is past the expiry the agent last saw. Renewing it again is
    pointless whatever the answer said (a 502 because Vault no longer knows it, a timeout):
    the credential in the files is dead, so the next step is a new one, not a retry. Only
    a refusal (401/403/409) stays a refusal: issuing would be refused the same way, except
    the broker's word that Vault no longer knows the lease (409 ``lease_expired``,
    ``lease_lost``)."""
    if status in (400, 404) and code in _LEASE_ENDED:
        return Outcome.REISSUE
    if status == 409 and code in _LEASE_GONE:
        return Outcome.REISSUE
    if _unavailable(status):
        return Outcome.REISSUE if expired else Outcome.UNAVAILABLE
    return Outcome.REFUSED


class Release(enum.StrEnum):
    DONE = "done"  # given back, or the broker no longer holds it
    RETRY = "retry"
    ABANDON = "abandon"  # the broker will not take it back from us (instance ended...)


def classify_release(status: int | None, code: str | None) -> Release:
    # The broker answers a release of a lease Vault no longer knew with 204 (recorded
    # expired or lost for the operator), never 409.
    if status == 204 or (status in (400, 404) and code in _LEASE_ENDED):
        return Release.DONE
    if _unavailable(status):
        return Release.RETRY
    return Release.ABANDON


def retry_in(outcome: Outcome, attempt: int, jitter: float) -> timedelta:
    """How long to wait before trying again after the ``attempt``-th failure in a row: up
    to 30 s while the broker is unavailable, up to 5 minutes after a refusal (a policy
    change or a terminated instance is not fixed by asking often)."""
    if outcome is Outcome.REFUSED:
        return timedelta(seconds=retry_delay(attempt, base=5.0, cap=300.0, jitter=jitter))
    return timedelta(seconds=retry_delay(attempt, base=1.0, cap=30.0, jitter=jitter))


def release_at(old: Lease, now: datetime, grace: timedelta = RELEASE_GRACE) -> datetime:
    """When a replaced lease is given back: after ``grace`` for the workload to switch,
    but while it still has half its remaining life (a release after expiry is useless)."""
    left = max(old.expires_at - now, timedelta(0))
    return now + min(grace, left / 2)


class Status(enum.StrEnum):
    PENDING = "pending"  # not written yet
    READY = "ready"  # written and current
    RETRYING = "retrying"  # written; the broker is unavailable, the files still work
    REFUSED = "refused"  # the broker refused it
    EXPIRED = "expired"  # written, but its lease has ended and no refresh succeeded


@dataclass(frozen=True)
class CredentialStatus:
    status: Status
    expires_at: datetime | None = None
    code: str | None = None  # the broker's error code, when it refused or failed

    def at(self, now: datetime) -> Status:
        if (
            self.status in (Status.READY, Status.RETRYING)
            and self.expires_at is not None
            and self.expires_at <= now
        ):
            return Status.EXPIRED
        return self.status


def readiness(statuses: Mapping[str, CredentialStatus], now: datetime) -> bool:
    """Ready once every credential is written and current (a broker outage alone does not
    make it unready: the files work until they expire) and none is refused."""
    return bool(statuses) and all(
        s.at(now) in (Status.READY, Status.RETRYING) for s in statuses.values()
    )
