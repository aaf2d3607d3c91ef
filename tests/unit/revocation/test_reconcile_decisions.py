"""The reconciler's decisions, pure: what happens to a lease past expiry, which unrecorded
lease belongs to which stuck request, what is an orphan, which paths are the broker's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker.engines.role import RoleSettings
from broker.leases import LeaseView
from broker.liveness.sightings import Sightings
from broker.revocation.reconcile import (
    ReconcileReport,
    expiry_action,
    is_orphan,
    issue_window,
    match_stuck,
    role_lease_prefixes,
    under_prefixes,
    unheld,
)
from broker.vault.client import LeaseInfo, _vault_time

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
S = timedelta(seconds=1)


def info(lease_id: str, issued: datetime | None, expires: datetime | None = None) -> LeaseInfo:
    return LeaseInfo(lease_id, issued, expires, False)


def row(lease_id: str, created: datetime) -> LeaseView:
    return LeaseView(lease_id, "i-1", "w", "r", "k", "issuing", False, created, None, None,
                     None, None, None, None, "db/creds/app")


@pytest.mark.parametrize(("lookup", "expected"), [
    (None, "expired"),
    (info("x", T0 - 600 * S, T0 + S), "extend"),
    (info("x", T0 - 600 * S, T0), "revoke"),
    (info("x", T0 - 600 * S, T0 - S), "revoke"),
    (info("x", T0 - 600 * S, None), "revoke"),
], ids=["gone", "renewed-meanwhile", "expires-now", "past-but-held", "no-expiry"])
def test_expiry_action(lookup: LeaseInfo | None, expected: str) -> None:
    assert expiry_action(lookup, T0) == expected


def test_issue_window_spans_the_issuing_bound_and_the_skew() -> None:
    assert issue_window(T0, 120, 5) == (T0 - 5 * S, T0 + 125 * S)


def test_match_stuck_gives_each_row_the_leases_issued_in_its_window() -> None:
    rows = [row("l-a", T0), row("l-b", T0 + 300 * S)]
    unknown = [
        info("db/creds/app/1", T0 - 6 * S),      # before a's window (skew 5): nobody's
        info("db/creds/app/2", T0 - 5 * S),      # a's window starts here (inclusive)
        info("db/creds/app/3", T0 + 60 * S),     # a's
        info("db/creds/app/4", T0 + 125 * S),    # a's window ends here (inclusive)
        info("db/creds/app/5", T0 + 126 * S),    # between the windows: an orphan later
        info("db/creds/app/6", T0 + 296 * S),    # b's
        info("db/creds/app/7", None),            # no time: matched by no window
    ]
    assert match_stuck(rows, unknown, issuing_timeout_s=120, skew_s=5) == {
        "l-a": ["db/creds/app/2", "db/creds/app/3", "db/creds/app/4"],
        "l-b": ["db/creds/app/6"],
    }


def test_overlapping_windows_list_a_lease_for_both_rows() -> None:
    rows = [row("l-a", T0), row("l-b", T0 + 10 * S)]
    matched = match_stuck(rows, [info("p/1", T0 + 12 * S)], issuing_timeout_s=120, skew_s=0)
    assert matched == {"l-a": ["p/1"], "l-b": ["p/1"]}


@pytest.mark.parametrize(("issued", "orphan"), [
    (T0 - 121 * S, True), (T0 - 120 * S, False), (T0 - 5 * S, False), (T0 + 5 * S, False),
    (None, True),
], ids=["older-than-bound", "at-bound", "young", "vault-clock-ahead", "no-time"])
def test_is_orphan_only_past_the_issuing_bound(issued: datetime | None, orphan: bool) -> None:
    assert is_orphan(info("p/1", issued), now=T0, min_age_s=120) is orphan


def test_unheld_keeps_what_no_live_row_holds() -> None:
    states = {"p/1": "active", "p/2": "issuing", "p/3": "revoking", "p/4": "revoked",
              "p/5": "expired", "p/6": "failed"}
    assert unheld(["p/1", "p/2", "p/3", "p/4", "p/5", "p/6", "p/7"], states) == [
        "p/4", "p/5", "p/6", "p/7"]


def test_role_lease_prefixes_cover_leased_roles_under_every_verb() -> None:
    roles = {
        "db": RoleSettings(engine="database", mount="database", vault_role="app"),
        "cert": RoleSettings(engine="pki", mount="pki", vault_role="web",
                             params={"common_name": "{workload}.svc.internal"}),
        "ssh": RoleSettings(engine="ssh", mount="ssh", vault_role="ops",
                            params={"valid_principals": "{workload}",
                                    "key_id": "{instance_id}"}),
        "kv": RoleSettings(engine="kv", mount="secret", vault_role="x",
                           params={"path": "apps/{workload}"}),
    }
    verbs = {"database": ["creds"], "pki": ["issue", "sign"], "ssh": ["sign"],
             "secret": ["data"]}
    assert role_lease_prefixes(roles, verbs) == {
        "database/creds/app", "pki/issue/web", "pki/sign/web"}
    assert role_lease_prefixes(roles, {}) == set()


def test_under_prefixes_matches_whole_path_levels() -> None:
    ids = ["db/creds/app/1", "db/creds/app2/1", "db/creds/app/x/2", "pki/issue/web/3"]
    assert under_prefixes(ids, ["db/creds/app", "pki/issue/web/"]) == [
        "db/creds/app/1", "db/creds/app/x/2", "pki/issue/web/3"]
    assert under_prefixes(ids, []) == []


def test_report_public_caps_lists_and_writes_utc() -> None:
    report = ReconcileReport(started_at=T0, orphans=60,
                             orphan_sample=[f"p/{i}" for i in range(60)])
    shown = report.public()
    assert shown["started_at"] == "2026-11-29T12:00:00Z"
    assert len(shown["orphan_sample"]) == 50 and shown["orphans"] == 60


def test_report_found_nothing_only_when_every_figure_is_empty() -> None:
    """A healthy pass logs at debug only: nothing found means every field but the start
    time and the skip flag is zero or empty, whatever fields the report grows."""
    assert ReconcileReport(started_at=T0).found_nothing()
    assert ReconcileReport(started_at=T0, skipped=True).found_nothing()
    for name, value in vars(ReconcileReport(started_at=T0)).items():
        if name in ("started_at", "skipped"):
            continue
        found = (1 if isinstance(value, int) else {"step": "x"} if isinstance(value, dict)
                 else ["x"])
        assert not ReconcileReport(started_at=T0, **{name: found}).found_nothing(), name


@pytest.mark.parametrize(("raw", "expected"), [
    ("2024-03-07T20:34:02.005655614+01:00",
     datetime(2024, 3, 7, 19, 34, 2, 5655, tzinfo=UTC)),
    ("2026-11-29T12:00:00Z", T0),
    ("2026-11-29T12:00:00.5Z", T0 + timedelta(milliseconds=500)),
    ("", None), (None, None), (17, None), ("yesterday", None), ("2026-13-40T00:00:00Z", None),
], ids=["nanoseconds-offset", "z", "fraction", "empty", "none", "number", "text",
        "impossible-date"])
def test_vault_times(raw: object, expected: datetime | None) -> None:
    assert _vault_time(raw) == expected


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[list[str], datetime]] = []
        self.fail = fail

    async def mark_seen(self, ids: list[str], at: datetime) -> None:
        if self.fail:
            raise RuntimeError("store down")
        self.calls.append((ids, at))


async def test_sightings_flush_once_and_keep_what_failed() -> None:
    seen = Sightings()
    for iid in ("i-2", "i-1", "i-2"):
        seen.note(iid)
    down = Recorder(fail=True)
    with pytest.raises(RuntimeError):
        await seen.flush(down, T0)
    assert len(seen) == 2
    up = Recorder()
    assert await seen.flush(up, T0) == 2
    assert up.calls == [(["i-1", "i-2"], T0)]
    assert await seen.flush(up, T0) == 0 and len(up.calls) == 1
