"""When the revocation worker stamps ``revoke_sent_at``: each chunk of leases right before
its own revocations, the leases a token revocation covers right before it; a stamp whose
revocation certainly did not take effect (Vault refused, connection refused, a token Vault
no longer knows) is taken back, one that may have reached Vault (a timeout) stays. With a
fake Vault and ledger, and the real ``LeaseEnder``."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from broker.errors import BrokerError, RevocationWaiting, UpstreamRejected, UpstreamUnavailable
from broker.leases import JobView, LeaseState, LeaseView, RevocationWork, TokenView
from broker.leases.ending import LeaseEnder
from broker.revocation import holds
from broker.revocation.bounded import Bounded
from broker.revocation.instance import Confirmed
from broker.revocation.settings import RevocationSettings
from broker.revocation.worker import RevocationWorker
from tests.harness.wait import eventually

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
REFUSED = UpstreamRejected("Vault refused the request", code="vault_invalid_request")
CONN_REFUSED = UpstreamUnavailable("Vault is unreachable", outcome_unknown=False)
TIMED_OUT = UpstreamUnavailable("Vault is unreachable", outcome_unknown=True)


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def now(self) -> datetime:
        self.t += timedelta(microseconds=1)  # every stamp its own time
        return self.t


class Vault:
    """Knows ``known``; ``fail`` maps a Vault lease id to the error its revocation gets;
    after ``away_after`` revocations every later one is refused a connection."""

    def __init__(self, known: set[str]) -> None:
        self.known = set(known)
        self.fail: dict[str, BaseException] = {}
        self.away_after: int | None = None
        self.revoked = 0
        self.token_error: BrokerError | None = None
        self.token_known = True
        self.log: list[tuple[str, str]] = []
        self.alone = True  # one node: a LIST is Vault's word
        self.lookups: list[str] = []
        self.lists = 0

    async def runs_alone(self) -> bool:
        return self.alone

    async def lease_exists(self, lease_id: str) -> bool:
        self.lookups.append(lease_id)
        return lease_id in self.known

    async def list_lease_keys(self, prefix: str) -> list[str]:
        self.lists += 1
        return [k.rsplit("/", 1)[1] for k in self.known if k.startswith(prefix + "/")]

    async def revoke_lease(self, lease_id: str) -> None:
        self.log.append(("revoke", lease_id))
        if self.away_after is not None and self.revoked >= self.away_after:
            raise CONN_REFUSED
        if lease_id in self.fail:
            raise self.fail[lease_id]
        self.revoked += 1
        self.known.discard(lease_id)

    async def revoke_accessor(self, accessor: str) -> bool:
        self.log.append(("revoke_accessor", accessor))
        if self.token_error is not None:
            raise self.token_error
        if self.token_known:
            self.known.clear()  # the token's revocation takes every lease under it
        return self.token_known


class Ledger:
    """The worker's ledger and the ender's, in one: stamps by lease id."""

    def __init__(self, vault: Vault, leases: list[LeaseView], tokens: list[TokenView]) -> None:
        self.vault, self.tokens = vault, tokens
        self.leases = {lease.lease_id: lease for lease in leases}
        self.stamps: dict[str, datetime] = {}
        self.token_revoked: list[str] = []
        self.ended: dict[str, LeaseState] = {}

    async def revocation_work(self, instance_id: str) -> RevocationWork:
        live = [
            replace(lease, revoke_sent_at=self.stamps.get(lease.lease_id))
            for lease in self.leases.values()
            if lease.lease_id not in self.ended
        ]
        return RevocationWork(tuple(self.tokens), tuple(live))

    async def mark_revoke_sent(self, lease_ids, at):
        self.vault.log.append(("stamp", ",".join(lease_ids)))
        for lid in lease_ids:
            self.stamps.setdefault(lid, at)
        return len(lease_ids)

    async def clear_revoke_sent(self, lease_ids, at):
        gone = [lid for lid in lease_ids if self.stamps.get(lid) == at]
        for lid in gone:
            del self.stamps[lid]
        return len(gone)

    async def end_decided(self, lease, ending, **_):
        self.ended[lease.lease_id] = ending.state
        return True

    async def mark_leases_ended(self, lease_ids, state, *, actor):
        for lid in lease_ids:
            self.ended[lid] = state
        return len(lease_ids)


def _lease(n: int, *, paths: int = 1, **kw) -> LeaseView:
    path = "database/creds/r" if paths == 1 else f"database/creds/r{n % paths}"
    return LeaseView(
        f"l-{n}",
        "i-1",
        "w",
        "db",
        "database",
        "active",
        False,
        NOW - timedelta(hours=1),
        NOW - timedelta(hours=1),
        NOW + timedelta(hours=1),
        None,
        f"{path}/v{n:03}",
        "acc-1",
        None,
        path,
        **kw,
    )


def _setup(n: int, *, issuing: int = 0, paths: int = 1) -> tuple[RevocationWorker, Vault, Ledger]:
    """``n`` leases spread over ``paths`` Vault paths: fewer than 16 under each are revoked
    one by one, more are left to the token's revocation."""
    leases = [_lease(i, paths=paths) for i in range(n)]
    leases += [
        replace(
            _lease(100 + i),
            vault_path=None,
            state="issuing",
            vault_lease_id=None,
            token_accessor=None,
            created_at=NOW - timedelta(hours=1),
        )
        for i in range(issuing)
    ]
    vault = Vault({str(lease.vault_lease_id) for lease in leases if lease.vault_lease_id})
    ledger = Ledger(vault, leases, [TokenView("acc-1", NOW + timedelta(hours=1), None)])
    clock = Clock()
    ender = LeaseEnder(vault, ledger, clock)  # type: ignore[arg-type]
    worker = RevocationWorker(
        RevocationSettings(),
        ledger,
        vault,
        clock,  # type: ignore[arg-type]
        ender=ender,
    )
    return worker, vault, ledger


JOB = JobView("j-1", "i-1", "running", 1, NOW, None, "admin", NOW, None)


async def _pass(worker: RevocationWorker, ledger: Ledger) -> None:
    """One pass of the job, and what it confirmed recorded as the worker records it (with
    the job's end, or on its own when the pass stops short)."""
    confirmed = Confirmed()
    try:
        await worker._pass.revoke_instance(JOB, confirmed)
    finally:
        ledger.token_revoked += confirmed.tokens
        for lid in confirmed.leases:
            ledger.ended[lid] = LeaseState.REVOKED


async def test_a_clean_pass_stamps_each_chunk_right_before_its_revocations() -> None:
    worker, vault, ledger = _setup(20, paths=2)
    await _pass(worker, ledger)
    kinds = [k for k, _ in vault.log]
    # 16, then 4, each stamped first; the token last, with nothing left to stamp.
    assert kinds == ["stamp", *["revoke"] * 16, "stamp", *["revoke"] * 4, "revoke_accessor"]
    assert set(ledger.stamps) == {f"l-{i}" for i in range(20)}
    assert set(ledger.ended) == set(ledger.stamps)
    assert ledger.token_revoked == ["acc-1"]


async def test_vault_away_leaves_no_stamp_on_leases_it_never_revoked() -> None:
    worker, vault, ledger = _setup(40, paths=3)
    vault.away_after = 20  # the second chunk meets a refused connection from its 5th lease
    with pytest.raises(UpstreamUnavailable):
        await _pass(worker, ledger)
    assert set(ledger.stamps) == {f"l-{i}" for i in range(20)}  # revoked: ours
    assert ("revoke_accessor", "acc-1") not in vault.log and not ledger.token_revoked
    # The third chunk was never stamped nor sent.
    assert ("revoke", "database/creds/r2/v032") not in vault.log


async def test_a_timeout_keeps_the_stamp_for_a_revocation_that_may_have_been_done() -> None:
    worker, vault, ledger = _setup(3)
    vault.fail["database/creds/r/v001"] = TIMED_OUT
    with pytest.raises(UpstreamUnavailable):
        await _pass(worker, ledger)
    assert set(ledger.stamps) == {"l-0", "l-1", "l-2"}
    assert not ledger.token_revoked


async def test_a_lease_vault_refused_is_unstamped_then_stamped_for_the_token() -> None:
    worker, vault, ledger = _setup(3, issuing=1)
    vault.fail["database/creds/r/v001"] = REFUSED
    await _pass(worker, ledger)  # the token's revocation took it: confirmed gone
    stamps = [ids for k, ids in vault.log if k == "stamp"]
    assert stamps == ["l-0,l-1,l-2", "l-1,l-100"]
    assert vault.log.index(("stamp", "l-1,l-100")) < vault.log.index(("revoke_accessor", "acc-1"))
    assert {"l-0", "l-1", "l-2", "l-100"} <= set(ledger.stamps)
    assert ledger.ended["l-1"] is LeaseState.REVOKED


@pytest.mark.parametrize("error", [REFUSED, CONN_REFUSED])
async def test_a_token_revocation_that_certainly_failed_takes_its_stamps_back(error) -> None:
    worker, vault, ledger = _setup(2, issuing=1)
    vault.fail["database/creds/r/v001"] = REFUSED
    vault.token_error = error
    with pytest.raises(BrokerError):
        await _pass(worker, ledger)
    assert set(ledger.stamps) == {"l-0"}  # revoked on its own; l-1 and l-100: nothing sent
    assert not ledger.token_revoked


async def test_a_token_revocation_that_may_have_been_done_keeps_its_stamps() -> None:
    worker, vault, ledger = _setup(2, issuing=1)
    vault.fail["database/creds/r/v001"] = REFUSED
    vault.token_error = TIMED_OUT
    with pytest.raises(UpstreamUnavailable):
        await _pass(worker, ledger)
    assert set(ledger.stamps) == {"l-0", "l-1", "l-100"}


async def test_a_token_vault_no_longer_knows_is_done_but_covers_nothing() -> None:
    worker, vault, ledger = _setup(2)
    vault.fail["database/creds/r/v001"] = REFUSED
    vault.token_known = False
    with pytest.raises(UpstreamRejected):  # l-1 still held: the job retries it alone
        await _pass(worker, ledger)
    assert ledger.token_revoked == ["acc-1"]  # not asked again
    assert set(ledger.stamps) == {"l-0"}
    # Next pass: l-1 is looked up again (no stamp); Vault forgot it meanwhile → lost.
    ledger.tokens = [TokenView("acc-1", NOW + timedelta(hours=1), NOW)]
    vault.known.discard("database/creds/r/v001")
    vault.fail.clear()
    before = len(vault.log)
    await _pass(worker, ledger)
    assert ledger.ended["l-1"] is LeaseState.LOST
    assert vault.log[before:] == []  # nothing sent: the token is not revoked again


async def test_many_leases_under_one_path_are_left_to_the_token_stamped_before_it() -> None:
    worker, vault, ledger = _setup(20)
    await _pass(worker, ledger)
    # One stamp for all twenty, then the token; no lease revoked one by one.
    assert vault.log == [
        ("stamp", ",".join(f"l-{i}" for i in range(20))),
        ("revoke_accessor", "acc-1"),
    ]
    assert ledger.ended == {f"l-{i}": LeaseState.REVOKED for i in range(20)}
    assert ledger.token_revoked == ["acc-1"]


async def test_leases_left_to_a_token_vault_no_longer_knows_are_revoked_one_by_one() -> None:
    worker, vault, ledger = _setup(20)
    vault.token_known = False
    await _pass(worker, ledger)
    kinds = [k for k, _ in vault.log]
    # The token's stamp is taken back: each lease is stamped again before its revocation.
    assert kinds == [
        "stamp",
        "revoke_accessor",
        "stamp",
        *["revoke"] * 16,
        "stamp",
        *["revoke"] * 4,
    ]
    assert ledger.ended == {f"l-{i}": LeaseState.REVOKED for i in range(20)}
    assert set(ledger.stamps) == {f"l-{i}" for i in range(20)}


async def test_what_vault_still_holds_after_its_queue_stalls_is_revoked_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(holds, "QUEUE_STALL_S", 0.05)
    worker, vault, ledger = _setup(20)
    stuck = {"database/creds/r/v003", "database/creds/r/v007"}

    async def revoke_accessor(accessor: str) -> bool:
        vault.log.append(("revoke_accessor", accessor))
        vault.known &= stuck  # Vault revoked all but two, and does not get to those
        return True

    vault.revoke_accessor = revoke_accessor  # type: ignore[method-assign]
    await _pass(worker, ledger)
    revoked = [lid for k, lid in vault.log if k == "revoke"]
    assert sorted(revoked) == sorted(stuck)
    assert ledger.ended == {f"l-{i}": LeaseState.REVOKED for i in range(20)}


async def test_a_lease_vault_keeps_refusing_after_the_token_fails_the_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(holds, "QUEUE_STALL_S", 0.05)
    worker, vault, ledger = _setup(20)
    vault.fail["database/creds/r/v005"] = REFUSED

    async def revoke_accessor(accessor: str) -> bool:
        vault.log.append(("revoke_accessor", accessor))
        vault.known &= {"database/creds/r/v005"}  # irrevocable: Vault keeps it
        return True

    vault.revoke_accessor = revoke_accessor  # type: ignore[method-assign]
    with pytest.raises(UpstreamRejected) as refused:
        await _pass(worker, ledger)
    assert refused.value is REFUSED
    assert "l-5" not in ledger.ended and len(ledger.ended) == 19
    assert ledger.token_revoked == ["acc-1"]


class LaggingListing(Vault):
    """A LIST that lacks ``unlisted`` although Vault knows them (a listing served by a node
    that lags, or by another one); lookups answer for the active node."""

    def __init__(self, known: set[str], unlisted: set[str]) -> None:
        super().__init__(known)
        self.unlisted = unlisted

    async def list_lease_keys(self, prefix: str) -> list[str]:
        return [k.rsplit("/", 1)[1] for k in self.known - self.unlisted if k.startswith(prefix)]


def _lagging(n: int, unlisted: set[str]) -> tuple[RevocationWorker, Vault, Ledger]:
    worker, vault, ledger = _setup(n)
    lagging = LaggingListing(vault.known, unlisted)
    worker._pass._vault = lagging  # type: ignore[assignment]
    worker._pass._holdings._vault = lagging  # type: ignore[assignment]
    worker._pass._ender._vault = lagging  # type: ignore[assignment]
    ledger.vault = lagging
    return worker, lagging, ledger


async def test_a_lease_no_listing_showed_is_revoked_alone_not_left_to_the_token() -> None:
    unseen = "database/creds/r/v003"
    worker, vault, ledger = _lagging(20, {unseen})
    await _pass(worker, ledger)
    # Looked up (known), then revoked on its own; the nineteen others left to the token.
    assert [x for k, x in vault.log if k == "revoke"] == [unseen]
    assert vault.log.index(("revoke", unseen)) < vault.log.index(("revoke_accessor", "acc-1"))
    assert ledger.ended == {f"l-{i}": LeaseState.REVOKED for i in range(20)}


async def test_a_listings_silence_never_ends_a_lease_vault_still_holds() -> None:
    """The false "revoked" the review found: a lease Vault keeps (its revocation refused,
    and the token's revocation does not take it) that the LIST does not show."""
    unseen = "database/creds/r/v003"
    worker, vault, ledger = _lagging(20, {unseen})
    vault.fail[unseen] = REFUSED

    async def revoke_accessor(accessor: str) -> bool:
        vault.log.append(("revoke_accessor", accessor))
        vault.known &= {unseen}  # Vault keeps it: it is not under this token after all
        return True

    vault.revoke_accessor = revoke_accessor  # type: ignore[method-assign]
    with pytest.raises(UpstreamRejected) as refused:
        await _pass(worker, ledger)
    assert refused.value is REFUSED
    assert "l-3" not in ledger.ended and len(ledger.ended) == 19


async def test_each_token_stamps_its_own_leases_right_before_its_revocation() -> None:
    worker, vault, ledger = _setup(40)
    for n in range(20, 40):  # the second half issued under a second token
        ledger.leases[f"l-{n}"] = replace(ledger.leases[f"l-{n}"], token_accessor="acc-2")
    ledger.tokens.append(TokenView("acc-2", NOW + timedelta(hours=1), None))
    under = {
        "acc-1": {f"database/creds/r/v{n:03}" for n in range(20)},
        "acc-2": {f"database/creds/r/v{n:03}" for n in range(20, 40)},
    }

    async def revoke_accessor(accessor: str) -> bool:
        vault.log.append(("revoke_accessor", accessor))
        if accessor == "acc-2":
            raise REFUSED  # certainly not done: its stamp alone is taken back
        vault.known -= under[accessor]
        return True

    vault.revoke_accessor = revoke_accessor  # type: ignore[method-assign]
    with pytest.raises(UpstreamRejected):
        await _pass(worker, ledger)
    assert vault.log[:4] == [
        ("stamp", ",".join(f"l-{n}" for n in range(20))),
        ("revoke_accessor", "acc-1"),
        ("stamp", ",".join(f"l-{n}" for n in range(20, 40))),
        ("revoke_accessor", "acc-2"),
    ]
    assert set(ledger.stamps) == {f"l-{n}" for n in range(20)}


async def test_vault_as_an_ha_cluster_is_asked_lease_by_lease_and_nothing_is_left_to_the_token():
    """A standby may answer a LIST from a copy that lags: no listing is used at all."""
    worker, vault, ledger = _setup(20)
    vault.alone = False
    await _pass(worker, ledger)
    assert vault.lists == 0
    assert len([k for k, _ in vault.log if k == "revoke"]) == 20
    # Before the revocations only: Vault answered each synchronous revocation once the
    # lease was gone, and is not asked again.
    assert sorted(vault.lookups) == sorted(f"database/creds/r/v{i:03}" for i in range(20))
    assert ledger.ended == {f"l-{i}": LeaseState.REVOKED for i in range(20)}


async def test_vault_as_an_ha_cluster_confirms_what_the_token_took_lease_by_lease() -> None:
    """Step 3 asks about leases whose own revocation Vault refused and the token's took:
    twenty under one path, which a single node would list; an HA cluster is asked one by
    one."""
    worker, vault, ledger = _setup(20)
    vault.alone = False
    for i in range(20):
        vault.fail[f"database/creds/r/v{i:03}"] = REFUSED
    await _pass(worker, ledger)
    assert vault.lists == 0
    assert len(vault.lookups) == 40  # before, and after the token's revocation
    assert ledger.ended == {f"l-{i}": LeaseState.REVOKED for i in range(20)}


async def test_only_a_lease_whose_revocation_vault_did_not_answer_is_asked_about_after() -> None:
    """One refused (Vault still holds it after the token's revocation, which then fails
    the pass), one timed out (it may or may not have been done), one answered."""
    worker, vault, ledger = _setup(3)
    vault.token_known = False  # the token takes nothing with it
    vault.fail["database/creds/r/v001"] = REFUSED
    vault.fail["database/creds/r/v002"] = TIMED_OUT
    with pytest.raises(UpstreamUnavailable):
        await _pass(worker, ledger)
    assert ledger.ended == {}  # Vault away: the pass ends before its check
    vault.fail.pop("database/creds/r/v002")
    vault.lookups.clear()
    with pytest.raises(UpstreamRejected):
        await _pass(worker, ledger)
    # v000 was answered in the first pass; the second asks about it once (step 0: a
    # stamp stands for it, so it is not taken for forgotten) and not after.
    assert vault.lookups.count("database/creds/r/v000") == 1
    assert ledger.ended["l-0"] is LeaseState.REVOKED  # its first pass's stamp covers it
    assert vault.lookups.count("database/creds/r/v001") == 2  # before, and after: held
    assert vault.lookups.count("database/creds/r/v002") == 1  # answered this time
    assert "l-1" not in ledger.ended and ledger.ended["l-2"] is LeaseState.REVOKED


async def test_a_listing_that_lags_later_in_the_pass_never_ends_a_lease_vault_holds() -> None:
    """The review's first case: step 0's LIST shows every lease, the token is one Vault no
    longer knows, one lease's own revocation is refused, and step 3's LIST (a node that
    lags) lacks it: it is looked up, held, and not recorded."""
    worker, vault, ledger = _lagging(20, set())
    held = "database/creds/r/v003"
    vault.fail[held] = REFUSED

    async def revoke_accessor(accessor: str) -> bool:
        vault.log.append(("revoke_accessor", accessor))
        assert isinstance(vault, LaggingListing)
        vault.unlisted = {held}  # from here on the listing lacks it
        return False

    vault.revoke_accessor = revoke_accessor  # type: ignore[method-assign]
    with pytest.raises(UpstreamRejected) as refused:
        await _pass(worker, ledger)
    assert refused.value is REFUSED
    assert held in vault.lookups
    assert "l-3" not in ledger.ended and len(ledger.ended) == 19


async def test_a_lease_gone_that_no_revocation_of_ours_covers_is_settled_not_revoked() -> None:
    """The review's second case: its own revocation refused (stamp taken back), no live
    token left to cover it, and then Vault's own expiry queue takes it."""
    worker, vault, ledger = _setup(3)
    ledger.tokens = [TokenView("acc-1", NOW + timedelta(hours=1), NOW)]  # revoked earlier
    taken = "database/creds/r/v001"

    async def revoke_lease(lease_id: str) -> None:
        vault.log.append(("revoke", lease_id))
        if lease_id == taken:
            vault.known.discard(lease_id)  # Vault's own queue, not our revocation
            raise REFUSED
        vault.known.discard(lease_id)

    vault.revoke_lease = revoke_lease  # type: ignore[method-assign]
    await _pass(worker, ledger)
    assert ledger.ended["l-1"] is LeaseState.LOST
    assert ledger.ended["l-0"] is LeaseState.REVOKED and ledger.ended["l-2"] is LeaseState.REVOKED


async def test_a_pass_cancelled_takes_back_the_stamps_of_revocations_not_sent() -> None:
    worker, vault, ledger = _setup(3)
    worker._pass._bounded = Bounded(1)  # the shared limit: one call at a time
    started = asyncio.Event()

    async def revoke_lease(lease_id: str) -> None:
        vault.log.append(("revoke", lease_id))
        started.set()
        await asyncio.Event().wait()  # Vault never answers

    vault.revoke_lease = revoke_lease  # type: ignore[method-assign]
    passing = asyncio.create_task(_pass(worker, ledger))
    await asyncio.wait_for(started.wait(), 10)
    passing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await passing
    # l-0's revocation was sent (Vault may have got it): its stamp stays; the two others
    # waited for the limit and were never sent.
    assert set(ledger.stamps) == {"l-0"}


async def test_floating_leases_lose_their_stamp_when_a_later_token_is_not_revoked() -> None:
    worker, vault, ledger = _setup(2, issuing=1)
    ledger.tokens.append(TokenView("acc-2", NOW + timedelta(hours=1), None))

    async def revoke_accessor(accessor: str) -> bool:
        vault.log.append(("revoke_accessor", accessor))
        if accessor == "acc-2":
            raise TIMED_OUT  # the issuing request may hold this one
        return True

    vault.revoke_accessor = revoke_accessor  # type: ignore[method-assign]
    with pytest.raises(UpstreamUnavailable):
        await _pass(worker, ledger)
    assert ("stamp", "l-100") in vault.log
    assert "l-100" not in ledger.stamps


async def test_floating_leases_lose_their_stamp_when_a_later_token_is_unknown_to_vault() -> None:
    worker, vault, ledger = _setup(2, issuing=1)
    ledger.tokens.append(TokenView("acc-2", NOW + timedelta(hours=1), None))

    async def revoke_accessor(accessor: str) -> bool:
        vault.log.append(("revoke_accessor", accessor))
        return accessor == "acc-1"  # acc-2: "No token found" (it may be the request's)

    vault.revoke_accessor = revoke_accessor  # type: ignore[method-assign]
    await _pass(worker, ledger)
    assert ("stamp", "l-100") in vault.log
    assert "l-100" not in ledger.stamps


async def test_a_pass_told_to_halt_stops_before_its_next_stamp() -> None:
    worker, vault, ledger = _setup(20, paths=2)  # two chunks, then the token
    halted = False

    original = vault.revoke_lease

    async def revoke_lease(lease_id: str) -> None:
        nonlocal halted
        halted = True  # the broker starts stopping while the first chunk is sent
        await original(lease_id)

    vault.revoke_lease = revoke_lease  # type: ignore[method-assign]
    confirmed = Confirmed(halt=lambda: halted)
    with pytest.raises(RevocationWaiting):
        await worker._pass.revoke_instance(JOB, confirmed)
    kinds = [k for k, _ in vault.log]
    assert kinds == ["stamp", *["revoke"] * 16]  # no second chunk, no token
    assert set(ledger.stamps) == {f"l-{i}" for i in range(16)}


async def test_floating_leases_lose_their_stamp_when_their_tokens_outcome_is_unknown() -> None:
    """The third review: the first token's revocation times out (it may or may not have
    been done) and the pass ends before the second token: the floating stamp, made for
    the first, is taken back; the first token's own leases keep theirs."""
    worker, vault, ledger = _setup(2, issuing=1)
    vault.fail["database/creds/r/v001"] = REFUSED  # l-1: left to acc-1's revocation
    ledger.tokens.append(TokenView("acc-2", NOW + timedelta(hours=1), None))
    vault.token_error = TIMED_OUT
    with pytest.raises(UpstreamUnavailable):
        await _pass(worker, ledger)
    assert ("stamp", "l-1,l-100") in vault.log
    assert set(ledger.stamps) == {"l-0", "l-1"}


async def test_a_pass_cancelled_while_its_stamp_is_written_takes_the_stamp_back() -> None:
    worker, vault, ledger = _setup(3)
    writing, release = asyncio.Event(), asyncio.Event()
    original = ledger.mark_revoke_sent

    async def slow_stamp(lease_ids, at):  # type: ignore[no-untyped-def]
        writing.set()
        await release.wait()
        return await original(lease_ids, at)

    ledger.mark_revoke_sent = slow_stamp  # type: ignore[method-assign]
    passing = asyncio.create_task(_pass(worker, ledger))
    await asyncio.wait_for(writing.wait(), 10)
    passing.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await passing
    await eventually(lambda: not ledger.stamps, "the stamp written is taken back")
    assert not [k for k, _ in vault.log if k == "revoke"]
