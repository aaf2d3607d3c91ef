"""The shell around the decision, with a fake Vault and ledger: it looks a lease up before
revoking it, stamps revoke_sent_at before the revocation, asks the direct check only when
it can matter, and counts what it records lost."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest

from broker.errors import BrokerError, UpstreamRejected, UpstreamUnavailable
from broker.leases.ending import (
    Ending,
    LeaseEnder,
    Revoked,
    sent_for_certain_not,
)
from broker.leases.states import LeaseState
from broker.leases.views import LeaseView

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
L = LeaseState


class Clock:
    def now(self) -> datetime:
        return NOW


class Vault:
    def __init__(self, known: set[str], *, keeps: bool = False,
                 fails: BrokerError | None = None) -> None:
        self.known, self.keeps, self.calls, self.fails = set(known), keeps, [], fails

    async def lease_exists(self, lease_id: str) -> bool:
        self.calls.append(("lookup", lease_id))
        return lease_id in self.known

    async def revoke_lease(self, lease_id: str) -> None:
        self.calls.append(("revoke", lease_id))
        if self.fails is not None:
            raise self.fails
        if not self.keeps:
            self.known.discard(lease_id)


class Ledger:
    def __init__(self, vault: Vault, *, moves: bool = True) -> None:
        self.vault, self.sent, self.ended, self.moves = vault, [], [], moves
        self.stamps: dict[str, datetime] = {}

    async def mark_revoke_sent(self, lease_ids, at):
        self.vault.calls.append(("stamp", tuple(lease_ids)))
        self.sent.extend(lease_ids)
        for lid in lease_ids:
            self.stamps.setdefault(lid, at)
        return len(lease_ids)

    async def clear_revoke_sent(self, lease_ids, at):
        self.vault.calls.append(("unstamp", tuple(lease_ids)))
        gone = [lid for lid in lease_ids if self.stamps.get(lid) == at]
        for lid in gone:
            del self.stamps[lid]
        return len(gone)

    async def end_decided(self, lease, ending, *, actor, engine, found_by, why):
        if not self.moves:
            return False
        self.ended.append((lease.lease_id, ending, engine, found_by, why))
        return True


@dataclass(frozen=True)
class Answer:
    gone: bool | None
    by: str


class Check:
    name = "crl"

    def __init__(self, answer: bool | None) -> None:
        self.answer, self.asked = answer, 0

    async def gone(self, lease: LeaseView) -> Answer:
        self.asked += 1
        return Answer(self.answer, self.name)


def _lease(**kw) -> LeaseView:
    base = LeaseView("l-1", "i-1", "w", "cert", "x509_certificate", "active", False,
                     NOW - timedelta(hours=1), NOW - timedelta(hours=1), NOW + timedelta(hours=1),
                     None, "pki/issue/r/abc", "acc", None, "pki/issue/r", {"serial_number": "1a"})
    return replace(base, **kw)


def _ender(vault: Vault, check: Check | None = None, *,
           moves: bool = True) -> tuple[LeaseEnder, Ledger]:
    ledger = Ledger(vault, moves=moves)
    return LeaseEnder(vault, ledger, Clock(), engine_of={"cert": "pki"}, checks=check), ledger


async def test_a_known_lease_is_stamped_before_it_is_revoked() -> None:
    vault = Vault({"pki/issue/r/abc"})
    ender, ledger = _ender(vault)
    got = await ender.end_one(_lease(), actor="a", found_by="release", ours=L.RELEASED)
    assert isinstance(got, Revoked)
    assert vault.calls == [("lookup", "pki/issue/r/abc"), ("stamp", ("l-1",)),
                           ("revoke", "pki/issue/r/abc"), ("lookup", "pki/issue/r/abc")]
    assert ledger.ended == []


async def test_a_forgotten_lease_is_lost_counted_and_never_revoked() -> None:
    vault = Vault(set())
    ender, ledger = _ender(vault)
    got = await ender.end_one(_lease(), actor="a", found_by="release", ours=L.RELEASED)
    assert got == Ending(L.LOST)
    assert ("revoke", "pki/issue/r/abc") not in vault.calls and ledger.sent == []
    assert ledger.ended == [("l-1", Ending(L.LOST), "pki", "release",
                             "vault_unknown_before_revocation")]
    assert ender.lost.counts() == {("cert", "release"): 1}


async def test_one_we_sent_a_revocation_for_is_not_looked_up_first_and_is_ours() -> None:
    vault = Vault(set())
    ender, ledger = _ender(vault)
    got = await ender.end_one(_lease(revoke_sent_at=NOW - timedelta(seconds=5)), actor="a",
                              found_by="lease_limit", ours=L.REVOKED)
    assert isinstance(got, Revoked)
    assert vault.calls[0] == ("revoke", "pki/issue/r/abc") and ledger.ended == []


async def test_a_lease_vault_keeps_after_revoking_is_unconfirmed() -> None:
    vault = Vault({"pki/issue/r/abc"}, keeps=True)
    ender, _ = _ender(vault)
    assert await ender.end_one(_lease(), actor="a", found_by="x", ours=L.REVOKED) is None


async def test_the_check_is_asked_only_when_it_can_matter() -> None:
    check = Check(True)
    ender, ledger = _ender(Vault(set()), check)
    out = await ender.settle_unknown(
        [_lease(), _lease(lease_id="l-2", expires_at=NOW - timedelta(minutes=1)),
         _lease(lease_id="l-3", revoke_sent_at=NOW)], actor="a", found_by="revocation")
    assert check.asked == 1
    assert out == {"l-1": Ending(L.REVOKED, confirmed_by="crl"), "l-2": Ending(L.EXPIRED),
                   "l-3": Ending(L.REVOKED)}
    assert ender.lost.counts() == {}


async def test_a_check_that_fails_or_cannot_tell_leaves_it_lost() -> None:
    class Broken(Check):
        async def gone(self, lease):
            raise RuntimeError("checker down")

    for check in (Check(None), Check(False), Broken(None)):
        ender, _ = _ender(Vault(set()), check)
        out = await ender.settle_unknown([_lease()], actor="a", found_by="reconciler")
        assert out == {"l-1": Ending(L.LOST)}


REFUSED = UpstreamRejected("Vault refused the request", code="vault_invalid_request")
CONN_REFUSED = UpstreamUnavailable("Vault is unreachable", outcome_unknown=False)
SEALED = UpstreamUnavailable("Vault is sealed", outcome_unknown=False)  # 503: answered
TIMED_OUT = UpstreamUnavailable("Vault is unreachable", outcome_unknown=True)  # or 502/504


@pytest.mark.parametrize(("error", "certain"), [
    (REFUSED, True), (CONN_REFUSED, True), (SEALED, True), (TIMED_OUT, False),
    (ValueError("x"), False), (True, False),
])
def test_only_an_answered_or_unsent_failure_is_certain(error: object, certain: bool) -> None:
    assert sent_for_certain_not(error) is certain


@pytest.mark.parametrize("error", [REFUSED, CONN_REFUSED, SEALED])
async def test_a_revocation_that_certainly_failed_takes_its_stamp_back(error) -> None:
    vault = Vault({"pki/issue/r/abc"}, fails=error)
    ender, ledger = _ender(vault)
    with pytest.raises(BrokerError) as raised:
        await ender.end_one(_lease(), actor="a", found_by="release", ours=L.RELEASED)
    assert raised.value is error
    assert vault.calls == [("lookup", "pki/issue/r/abc"), ("stamp", ("l-1",)),
                           ("revoke", "pki/issue/r/abc"), ("unstamp", ("l-1",))]
    assert ledger.stamps == {}  # Vault forgetting it later is not our doing: lost


async def test_a_revocation_that_may_have_reached_vault_keeps_its_stamp() -> None:
    vault = Vault({"pki/issue/r/abc"}, fails=TIMED_OUT)
    ender, ledger = _ender(vault)
    with pytest.raises(UpstreamUnavailable):
        await ender.end_one(_lease(), actor="a", found_by="release", ours=L.RELEASED)
    assert ledger.stamps == {"l-1": NOW} and ("unstamp", ("l-1",)) not in vault.calls


async def test_a_stamp_another_revocation_made_is_never_taken_back() -> None:
    vault = Vault({"pki/issue/r/abc"}, fails=REFUSED)
    ender, ledger = _ender(vault)
    ledger.stamps["l-1"] = NOW - timedelta(minutes=1)
    with pytest.raises(UpstreamRejected):
        await ender.end_one(_lease(revoke_sent_at=NOW - timedelta(minutes=1)), actor="a",
                            found_by="lease_limit", ours=L.REVOKED)
    assert ledger.stamps == {"l-1": NOW - timedelta(minutes=1)}
    assert [c for c in vault.calls if c[0] in ("stamp", "unstamp")] == []


async def test_an_unstamp_only_clears_its_own_time() -> None:
    ender, ledger = _ender(Vault(set()))
    stamp = await ender.stamp(["l-1", "l-2"])
    ledger.stamps["l-3"] = NOW - timedelta(seconds=1)  # another path's
    assert await ender.unstamp(stamp, ["l-2", "l-3"]) == 1
    assert ledger.stamps == {"l-1": NOW, "l-3": NOW - timedelta(seconds=1)}
    assert await ender.unstamp(await ender.stamp([])) == 0


async def test_only_endings_actually_recorded_are_reported() -> None:
    """Another path ended the lease (or sent its revocation) meanwhile: the decision was
    not recorded, so it is not reported, and nothing is counted lost."""
    ender, _ = _ender(Vault(set()), moves=False)
    assert await ender.settle_unknown([_lease()], actor="a", found_by="reconciler") == {}
    assert ender.lost.counts() == {}
    assert await ender.end_one(_lease(), actor="a", found_by="release", ours=L.RELEASED) is None


LOST_FIELDS = ("lease_id", "instance_id", "role", "vault_path", "found_by")


def _lost_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, dict[str, object]]]:
    return [(r.levelname, r.getMessage(), {k: r.__dict__[k] for k in LOST_FIELDS})
            for r in caplog.records if r.getMessage().startswith("a lease was lost")]


@pytest.mark.parametrize("path", ["settle_unknown", "lost_past_expiry"])
async def test_a_loss_is_recorded_counted_and_logged_the_same_way(
        path: str, caplog: pytest.LogCaptureFixture) -> None:
    """Both ways a lease is found lost record it, count it by (role, found_by) and write
    one error line with what an operator needs to end the credential by hand."""
    caplog.set_level(logging.ERROR, logger="broker.leases.ending")
    lease = _lease(expires_at=NOW - timedelta(minutes=5)) if path == "lost_past_expiry" \
        else _lease()
    ender, ledger = _ender(Vault(set()), Check(False))
    if path == "settle_unknown":
        out = await ender.settle_unknown([lease], actor="a", found_by="reconciler", why="w")
        assert out == {"l-1": Ending(L.LOST)}
        message = ("a lease was lost: Vault no longer knew it before the broker revoked it; "
                   "the credential may still work until it is ended by hand")
    else:
        assert await ender.lost_past_expiry(
            [lease], actor="a", found_by="reconciler", why="w") == (["l-1"], {"l-1"})
        message = ("a lease was lost: Vault no longer knew it although its credential still "
                   "works past its expiry; it works until it is ended by hand")
    assert ledger.ended == [("l-1", Ending(L.LOST), "pki", "reconciler", "w")]
    assert ender.lost.counts() == {("cert", "reconciler"): 1}
    assert _lost_lines(caplog) == [("ERROR", message, {
        "lease_id": "l-1", "instance_id": "i-1", "role": "cert",
        "vault_path": "pki/issue/r", "found_by": "reconciler"})]


@pytest.mark.parametrize("path", ["settle_unknown", "lost_past_expiry"])
async def test_a_loss_another_path_ended_first_is_neither_counted_nor_logged(
        path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="broker.leases.ending")
    ender, _ = _ender(Vault(set()), Check(False), moves=False)
    if path == "settle_unknown":
        assert await ender.settle_unknown([_lease()], actor="a", found_by="reconciler") == {}
    else:
        lease = _lease(expires_at=NOW - timedelta(minutes=5))
        assert await ender.lost_past_expiry(
            [lease], actor="a", found_by="reconciler", why="w") == ([], {"l-1"})
    assert ender.lost.counts() == {} and _lost_lines(caplog) == []
