"""brokerctl's listings without a broker: the states it offers are the broker's, --since
and --limit parsing, a cut list's notice, and how each output mode prints a listing."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from broker.cli import ctl, ctl_listings
from broker.leases import InstanceState, JobState, LeaseState


def test_the_cli_offers_exactly_the_brokers_states():
    assert sorted(ctl_listings.LEASE_STATES) == sorted(s.value for s in LeaseState)
    assert sorted(ctl_listings.INSTANCE_STATES) == sorted(s.value for s in InstanceState)
    assert sorted(ctl_listings.JOB_STATES) == sorted(s.value for s in JobState)


NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("text,expected", [
    ("2h", "2026-12-02T10:00:00+00:00"),
    ("90m", "2026-12-02T10:30:00+00:00"),
    ("1d", "2026-12-01T12:00:00+00:00"),
    ("2026-12-01T08:00:00Z", "2026-12-01T08:00:00+00:00"),
    ("2026-12-01T08:00:00", "2026-12-01T08:00:00+00:00"),
    ("2026-12-01T08:00:00+01:00", "2026-12-01T08:00:00+01:00"),
], ids=["hours", "minutes", "days", "time_z", "time_naive_utc", "time_offset"])
def test_since_takes_a_duration_back_or_a_time(text, expected):
    assert ctl_listings.since(text, NOW) == expected


@pytest.mark.parametrize("parse,text", [
    (ctl_listings.since, "yesterday"), (ctl_listings.positive, "0"),
    (ctl_listings.positive, "-3"), (ctl_listings.positive, "ten")])
def test_bad_values_are_usage_errors(parse, text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse(text)


class Pages:
    """A broker answering a listing from ``rows``, pages cut at the limit asked."""

    def __init__(self, rows: list[str]) -> None:
        self.rows = rows
        self.calls: list[dict[str, Any]] = []

    def call(self, method: str, path: str, query: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(query)
        start = self.rows.index(query["after"]) + 1 if query["after"] else 0
        page = self.rows[start:start + query["limit"]]
        more = start + len(page) < len(self.rows)
        return {"items": [{"id": r} for r in page], "next": page[-1] if more else None}


def test_collect_pages_up_to_the_limit_and_says_where_it_stopped():
    broker = Pages([f"r{n:04d}" for n in range(2500)])
    listing = ctl_listings.collect(broker, "/p", "items", {"state": "x"}, limit=2100, after=None)
    assert len(listing.items) == 2100 and listing.fields == {"next": "r2099"}
    assert [c["limit"] for c in broker.calls] == [1000, 1000, 100]
    assert listing.notice == "2100 items shown; more results: pass --limit N or --after r2099"

    rest = ctl_listings.collect(broker, "/p", "items", {}, limit=1000, after="r2099")
    assert [r["id"] for r in rest.items] == [f"r{n:04d}" for n in range(2100, 2500)]
    assert (rest.fields, rest.notice) == ({"next": None}, None)


def test_a_complete_list_at_exactly_the_limit_has_no_notice():
    listing = ctl_listings.collect(Pages(["a", "b"]), "/p", "items", {}, limit=2, after=None)
    assert (len(listing.items), listing.notice) == (2, None)


LISTING = ctl.Listing("leases", [{"lease_id": "l-1"}, {"lease_id": "l-2"}], {"next": "l-2"},
                      "2 leases shown; more results: pass --limit N or --after l-2")


@pytest.mark.parametrize("output,stdout,stderr", [
    ("json", json.dumps({"leases": LISTING.items, "next": "l-2"}, indent=2) + "\n", ""),
    ("jsonl", '{"lease_id":"l-1"}\n{"lease_id":"l-2"}\n', "brokerctl: " + LISTING.notice + "\n"),
    ("table", "LEASE_ID\nl-1\nl-2\n", "brokerctl: " + LISTING.notice + "\n"),
], ids=["json_has_next", "jsonl_notice_on_stderr", "table_notice_on_stderr"])
def test_a_cut_listing_says_so_in_every_output(capsys, output, stdout, stderr):
    args = argparse.Namespace(output=output, show=lambda rows: ctl.table(rows, ["lease_id"]))
    ctl._print(args, LISTING)
    assert capsys.readouterr() == (stdout, stderr)


RESOLVED = {
    "lease_id": "l-" + "a" * 32, "instance_id": "i-1", "workload": "payments",
    "role": "dev-db", "kind": "database_login", "state": "resolved", "renewable": True,
    "created_at": "2026-12-02T10:00:00Z", "issued_at": "2026-12-02T10:00:01Z",
    "expires_at": "2026-12-02T11:00:01Z", "ended_at": "2026-12-02T10:20:00Z",
    "vault_lease_id": "database/creds/dev-db/x", "vault_path": "database/creds/dev-db",
    "credential_ref": {"username": "v-dev-db-x7"}, "revoke_sent_at": None,
    "resolution": {"at": "2026-12-02T10:30:00Z", "by": "operator:alice",
                   "reason": "dropped the role by hand", "incident": "INC-7"},
}


def test_a_resolved_lease_shows_who_resolved_it_when_and_why():
    shown = ctl_listings.show_lease(RESOLVED).splitlines()
    assert shown[-4:] == [
        "resolved_at     2026-12-02T10:30:00Z",
        "resolved_by     operator:alice",
        "reason          dropped the role by hand",
        "incident        INC-7",
    ]
    assert "state           resolved" in shown
    assert not any(line.startswith("LOST") for line in shown)


def test_a_lost_lease_says_how_to_mark_it_handled_once_ended():
    lost = {**RESOLVED, "state": "lost", "resolution": None}
    shown = ctl_listings.show_lease(lost).splitlines()
    assert not any(line.startswith("resolved") for line in shown)
    assert shown[-1] == (
        "LOST: Vault no longer knew this lease before the broker revoked it; the credential "
        "may still work: end it by hand (README: Lost leases and alerting), then: brokerctl "
        f"leases resolve {lost['lease_id']} --reason TEXT")


@pytest.mark.parametrize("changed,head", [
    (True, f"lease {RESOLVED['lease_id']} resolved"),
    (False, f"lease {RESOLVED['lease_id']} was resolved already; nothing changed"),
], ids=["now", "already"])
def test_resolve_says_whether_it_changed_anything(changed, head):
    assert ctl_listings.show_resolve({"lease": RESOLVED, "changed": changed}) == (
        f"{head}: by operator:alice at 2026-12-02T10:30:00Z, incident INC-7\n"
        "reason: dropped the role by hand")


def test_resolve_needs_a_reason_that_says_something(capsys):
    with pytest.raises(SystemExit) as usage:
        ctl.main(["--url", "http://127.0.0.1:1", "--admin-token", "t", "leases", "resolve",
                  "l-" + "a" * 32])
    assert usage.value.code == 2
    assert "--reason" in capsys.readouterr().err
    code = ctl.main(["--url", "http://127.0.0.1:1", "--admin-token", "t", "leases", "resolve",
                     "l-" + "a" * 32, "--reason", "  "])
    assert code == 2  # refused before any call (nothing listens on port 1)
    assert capsys.readouterr().err == (
        "brokerctl: --reason: say how the credential was ended by hand\n")
