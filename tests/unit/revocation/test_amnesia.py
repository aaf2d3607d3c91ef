"""The reconciler's look for leases Vault forgot: its pure decisions, and its shell with a
fake Vault, ledger and direct check. Every recorded row is compared with the listing over
successive passes, however many; a lease the listing lacks is looked up before it is
settled; a lease past its expiry Vault does not know is lost only when a direct check finds
its credential still valid. And the worker confirms a lease a LIST lacks with a lookup."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.leases.ending import EXPIRY_MARGIN, LeaseEnder
from broker.leases.sql.reconcile import like_prefix
from broker.leases.states import LeaseState
from broker.leases.views import LeaseView
from broker.revocation.amnesia import (
    ALIVE_PAST_EXPIRY,
    MISSING_ROWS_PER_PASS,
    Amnesia,
    absent_from,
    unexpired_after,
    worth_asking,
)
from broker.revocation.bounded import Bounded
from broker.revocation.holds import LIST_CONFIRM_MIN
from broker.revocation.settings import RevocationSettings
from broker.revocation.worker import RevocationWorker

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
L = LeaseState


def _lease(n: int, **kw: Any) -> LeaseView:
    base = LeaseView(
        f"l-{n:05d}", "i-1", "w", "db", "database_login", "active", True,
        NOW - timedelta(hours=1) + timedelta(microseconds=n), NOW - timedelta(hours=1),
        NOW + timedelta(hours=1), None, f"database/creds/app/v{n}", "acc", None,
        "database/creds/app", {"username": f"v-{n}"}, None,
    )
    return replace(base, **kw)


# -- pure ----------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "pattern"), [
    ("database/creds/app", "database/creds/app/%"),
    ("db/creds/my_app", "db/creds/my!_app/%"),
    ("db/creds/100%", "db/creds/100!%/%"),
    ("db/creds/wow!", "db/creds/wow!!/%"),
    ("a_b%c!d", "a!_b!%c!!d/%"),
])
def test_like_prefix_takes_the_path_literally(path: str, pattern: str) -> None:
    assert like_prefix(path) == pattern


@pytest.mark.parametrize("skew", [0, 5, 600])
def test_unexpired_after_adds_the_margin_and_the_skew(skew: int) -> None:
    assert unexpired_after(NOW, skew) == NOW + EXPIRY_MARGIN + timedelta(seconds=skew)


def test_absent_from_keeps_the_rows_the_listing_lacks() -> None:
    rows = [_lease(1), _lease(2), _lease(3)]
    assert absent_from(rows, {"database/creds/app/v2"}) == [rows[0], rows[2]]
    assert absent_from(rows, {r.vault_lease_id for r in rows if r.vault_lease_id}) == []
    assert absent_from([], set()) == []


@pytest.mark.parametrize(("sent", "engine", "expected"), [
    (False, "database", True),
    (False, "rabbitmq", True),
    (False, None, True),
    (False, "pki", False),  # a certificate dies at its expiry by itself
    (True, "database", False),  # our revocation covers it
    (True, "pki", False),
])
def test_worth_asking(sent: bool, engine: str | None, expected: bool) -> None:
    lease = _lease(1, revoke_sent_at=NOW - timedelta(minutes=1) if sent else None)
    assert worth_asking(lease, engine) is expected


# -- the shell, with fakes -----------------------------------------------------------


class Clock:
    def now(self) -> datetime:
        return NOW


class Vault:
    def __init__(self, known: set[str]) -> None:
        self.known, self.lookups = set(known), []

    async def runs_alone(self) -> bool:
        return True

    async def lease_exists(self, lease_id: str) -> bool:
        self.lookups.append(lease_id)
        return lease_id in self.known

    async def revoke_lease(self, lease_id: str) -> None:
        self.known.discard(lease_id)


class Ledger:
    """Rows under one path, paged by (created_at, lease_id) as the SQL does; ``ended``
    records what the ender decided."""

    def __init__(self, rows: list[LeaseView]) -> None:
        self.rows, self.ended, self.pages = rows, [], 0
        self.fail_at: int | None = None

    async def unsent_live_under(self, path, *, expiring_after, after=None, limit):
        self.pages += 1
        if self.fail_at is not None and self.pages == self.fail_at:
            raise RuntimeError("store away")
        live = {lid for lid, _ in self.ended}
        rows = sorted(
            (r for r in self.rows if r.lease_id not in live and r.expires_at > expiring_after
             and str(r.vault_lease_id).startswith(path + "/")),
            key=lambda r: (r.created_at, r.lease_id),
        )
        if after is not None:
            rows = [r for r in rows if (r.created_at, r.lease_id) > after]
        page = rows[:limit]
        cursor = (page[-1].created_at, page[-1].lease_id) if len(page) == limit else None
        return page, cursor

    async def mark_revoke_sent(self, lease_ids):
        return len(lease_ids)

    async def end_decided(self, lease, ending, *, actor, engine, found_by, why):
        self.ended.append((lease.lease_id, (ending.state, ending.confirmed_by, why)))
        return True


@dataclass(frozen=True)
class Answer:
    gone: bool | None
    by: str = "database"


class Check:
    def __init__(self, answer: bool | None | Exception) -> None:
        self.answer, self.asked = answer, []

    async def gone(self, lease: LeaseView) -> Answer:
        self.asked.append(lease.lease_id)
        if isinstance(self.answer, Exception):
            raise self.answer
        return Answer(self.answer)


def _amnesia(rows, known, *, check=None, batch=3):
    vault, ledger = Vault(known), Ledger(rows)
    ender = LeaseEnder(vault, ledger, Clock(), engine_of={"db": "database", "cert": "pki"},
                       checks=check)
    amnesia = Amnesia(ledger, vault, Clock(), ender, Bounded(),  # type: ignore[arg-type]
                      engine_of={"db": "database", "cert": "pki"}, batch=batch, clock_skew_s=5)
    return amnesia, vault, ledger


async def test_every_row_is_compared_with_the_listing_past_the_first_page() -> None:
    rows = [_lease(n) for n in range(10)]
    listed = {r.vault_lease_id for r in rows if r.vault_lease_id} - {"database/creds/app/v8"}
    amnesia, vault, ledger = _amnesia(rows, listed, batch=3)
    found = await amnesia.missing("database/creds/app", listed)
    # The forgotten one is on the last page, far past the first ``batch`` rows.
    assert found.lost == ["l-00008"]
    assert vault.lookups == ["database/creds/app/v8"]  # only the absent one is looked up
    assert ledger.ended == [("l-00008", (L.LOST, None, "missing_from_vault_listing"))]


async def test_a_lease_the_listing_lacks_but_vault_knows_is_left_alone() -> None:
    rows = [_lease(1), _lease(2)]
    amnesia, vault, ledger = _amnesia(rows, {"database/creds/app/v1", "database/creds/app/v2"})
    found = await amnesia.missing("database/creds/app", {"database/creds/app/v1"})
    assert found.lost == [] and ledger.ended == []
    assert vault.lookups == ["database/creds/app/v2"]


async def test_a_pass_stops_at_its_budget_and_the_next_resumes_there(monkeypatch) -> None:
    monkeypatch.setattr("broker.revocation.amnesia.MISSING_ROWS_PER_PASS", 4)
    rows = [_lease(n) for n in range(10)]
    amnesia, vault, ledger = _amnesia(rows, set(), batch=2)
    first = await amnesia.missing("database/creds/app", set())
    assert first.lost == [f"l-{n:05d}" for n in range(4)]
    second = await amnesia.missing("database/creds/app", set())
    assert second.lost == [f"l-{n:05d}" for n in range(4, 8)]
    third = await amnesia.missing("database/creds/app", set())
    assert third.lost == ["l-00008", "l-00009"]
    assert len(vault.lookups) == 10


async def test_the_walk_starts_over_once_it_reached_the_end(monkeypatch) -> None:
    monkeypatch.setattr("broker.revocation.amnesia.MISSING_ROWS_PER_PASS", 4)
    rows = [_lease(n) for n in range(6)]
    listed = {r.vault_lease_id for r in rows if r.vault_lease_id}
    amnesia, vault, ledger = _amnesia(rows, listed, batch=2)
    await amnesia.missing("database/creds/app", listed)  # rows 0-3
    await amnesia.missing("database/creds/app", listed)  # rows 4-5: the end
    listed.discard("database/creds/app/v1")
    vault.known.discard("database/creds/app/v1")
    found = await amnesia.missing("database/creds/app", listed)  # from the start again
    assert found.lost == ["l-00001"]


async def test_a_failed_page_is_retried_by_the_next_pass(monkeypatch) -> None:
    monkeypatch.setattr("broker.revocation.amnesia.MISSING_ROWS_PER_PASS", 100)
    rows = [_lease(n) for n in range(6)]
    amnesia, vault, ledger = _amnesia(rows, set(), batch=2)
    ledger.fail_at = 2
    with pytest.raises(RuntimeError):
        await amnesia.missing("database/creds/app", set())
    found = await amnesia.missing("database/creds/app", set())
    assert found.lost == ["l-00002", "l-00003", "l-00004", "l-00005"]
    assert [lid for lid, _ in ledger.ended] == [f"l-{n:05d}" for n in range(6)]


async def test_paths_keep_their_own_place(monkeypatch) -> None:
    monkeypatch.setattr("broker.revocation.amnesia.MISSING_ROWS_PER_PASS", 2)
    rows = [_lease(n) for n in range(4)]
    amnesia, vault, ledger = _amnesia(rows, set(), batch=2)
    assert (await amnesia.missing("database/creds/app", set())).lost == ["l-00000", "l-00001"]
    assert (await amnesia.missing("other/path", set())).lost == []  # nothing there
    assert amnesia._cursors == {"database/creds/app": (rows[1].created_at, rows[1].lease_id)}


PAST = NOW - timedelta(minutes=5)


@pytest.mark.parametrize(("answer", "lost"), [
    (False, True),  # the credential still works past its expiry: Vault forgot it
    (True, False),
    (None, False),
    (RuntimeError("checker down"), False),
])
async def test_past_expiry_a_live_credential_is_lost(answer: Any, lost: bool) -> None:
    check = Check(answer)
    lease = _lease(1, expires_at=PAST)
    amnesia, vault, ledger = _amnesia([lease], set(), check=check)
    found, expired = await amnesia.past_expiry([lease])
    assert check.asked == ["l-00001"]
    if lost:
        assert (found.lost, expired) == (["l-00001"], [])
        assert ledger.ended == [("l-00001", (L.LOST, None, ALIVE_PAST_EXPIRY))]
    else:
        assert (found.lost, expired) == ([], ["l-00001"])  # the caller records it expired
        assert ledger.ended == []


async def test_past_expiry_without_checks_everything_unstamped_expired() -> None:
    leases = [_lease(1, expires_at=PAST), _lease(2, expires_at=PAST)]
    amnesia, vault, ledger = _amnesia(leases, set(), check=None)
    found, expired = await amnesia.past_expiry(leases)
    assert (found.lost, found.expired, expired) == ([], 0, ["l-00001", "l-00002"])


async def test_past_expiry_a_certificate_is_not_asked_and_ours_stays_revoked() -> None:
    check = Check(False)
    cert = _lease(1, role="cert", expires_at=PAST)
    ours = _lease(2, expires_at=PAST, revoke_sent_at=PAST)
    amnesia, vault, ledger = _amnesia([cert, ours], set(), check=check)
    found, expired = await amnesia.past_expiry([cert, ours])
    assert check.asked == []
    assert (found.lost, expired) == ([], ["l-00001"])
    assert ledger.ended == [("l-00002", (L.REVOKED, None, "vault_unknown_before_revocation"))]


# -- the worker: a lease a LIST lacks is looked up before it counts as forgotten ------


class ListingVault(Vault):
    def __init__(self, known: set[str], listed: set[str]) -> None:
        super().__init__(known)
        self.listed = listed

    async def list_lease_keys(self, path: str) -> list[str]:
        return sorted(i.removeprefix(path + "/") for i in self.listed if i.startswith(path))


def _worker(vault: Vault) -> RevocationWorker:
    return RevocationWorker(RevocationSettings(), None, vault, Clock(),  # type: ignore[arg-type]
                            ender=None)  # type: ignore[arg-type]


async def test_the_worker_looks_up_what_the_listing_lacks_before_calling_it_forgotten() -> None:
    ids = [f"database/creds/app/v{n}" for n in range(LIST_CONFIRM_MIN + 2)]
    listed = set(ids) - {ids[0], ids[1]}
    vault = ListingVault(set(ids) - {ids[1]}, listed)  # Vault knows ids[0]; LIST lacks it
    worker = _worker(vault)
    held = (await worker._pass._holdings.survey(ids)).held
    assert held == set(ids) - {ids[1]}
    assert sorted(vault.lookups) == sorted([ids[0], ids[1]])
    # After our own revocation a listing is enough: no lookups.
    vault.lookups.clear()
    assert await worker._pass._holdings.held(ids, trusted=ids) == listed
    assert vault.lookups == []


def test_the_budget_is_many_pages() -> None:
    assert MISSING_ROWS_PER_PASS >= 10 * 500
