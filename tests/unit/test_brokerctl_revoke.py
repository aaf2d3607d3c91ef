"""``brokerctl revoke``'s argument handling (pure): selectors into the API's selection,
times, the single-instance path, the bulk confirmations, and the exit code."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from broker.cli.ctl import EXIT_FAILED, EXIT_NEVER_SEEN, EXIT_OK, EXIT_USAGE, CtlError, _parser
from broker.cli.ctl_revoke import (
    MAX_PASSES,
    _progress_line,
    bulk_refusal,
    cmd_revoke,
    revoke_exit,
    selection_of,
    show_revoke,
    single_instance,
    when,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def parse(*argv):
    return _parser().parse_args(["revoke", *argv])


def test_selectors_repeat_and_combine():
    args = parse("--instance", "a", "--instance", "b", "--instance", "a", "--workload", "w",
                 "--role", "db", "--role", "kv", "--issuer", "dev", "--claim", "team=pay",
                 "--lease", "l-1", "--issued-after", "2h", "--issued-before",
                 "2026-03-01T11:30:00+01:00")
    assert selection_of(args, NOW) == {
        "instances": ["a", "b"], "workloads": ["w"], "issuers": ["dev"], "roles": ["db", "kv"],
        "leases": ["l-1"], "claims": ["team=pay"], "issued_after": "2026-03-01T10:00:00Z",
        "issued_before": "2026-03-01T10:30:00Z"}


@pytest.mark.parametrize("text,expected", [
    ("30m", "2026-03-01T11:30:00Z"), ("1d", "2026-02-28T12:00:00Z"),
    ("2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z"),
    ("2026-01-01T00:00:00", "2026-01-01T00:00:00Z"),
], ids=["minutes_ago", "day_ago", "rfc3339", "naive_is_utc"])
def test_when(text, expected):
    assert when(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "-5m"], ids=["words", "negative"])
def test_when_refuses(text):
    with pytest.raises(ValueError):
        when(text, NOW)


@pytest.mark.parametrize("argv,message", [
    ([], "name what to revoke"),
    (["--claim", "team"], "expected key=value"),
    (["--issued-after", "soon"], "--issued-after"),
], ids=["no_selector", "bad_claim", "bad_time"])
def test_usage_errors(argv, message):
    with pytest.raises(CtlError) as info:
        selection_of(parse(*argv), NOW)
    assert info.value.exit_code == EXIT_USAGE and message in str(info.value)


def test_one_instance_alone_takes_the_single_path():
    assert single_instance({"instances": ["a"]}) == "a"
    assert single_instance({"instances": ["a", "b"]}) is None
    assert single_instance({"instances": ["a"], "roles": ["db"]}) is None


@pytest.mark.parametrize("argv,reach,refused", [
    ([], 1, None), ([], 2, "--yes"), (["--yes"], 2, "--reason"),
    (["--yes", "--reason", "x"], 2, None), (["--max", "5", "--reason", "x"], 2, None),
    (["--max", "5"], 2, "--reason"),
], ids=["one", "bulk_unconfirmed", "bulk_no_reason", "bulk_ok", "max_guard", "max_no_reason"])
def test_bulk_needs_confirmation_and_reason(argv, reach, refused):
    why = bulk_refusal(reach, parse("--workload", "w", *argv))
    assert (why is None) if refused is None else (refused in why)


def test_never_seen_is_said_and_has_its_exit_code():
    job = {"job_id": "j-1", "state": "pending", "attempts": 0, "last_error": None}
    one = {"instance_id": "typo", "job": job, "never_seen": True}
    assert show_revoke(one).startswith("instance typo: never seen: tombstoned, 0 leases;")
    assert revoke_exit(one) == EXIT_NEVER_SEEN
    assert revoke_exit({**one, "never_seen": False}) == EXIT_OK
    bulk = {"terminated": [], "never_seen": ["ghost"], "counts": {"instances": 0, "leases": 0,
                                                                   "never_seen": 1}}
    assert "ghost: never seen: tombstoned, 0 leases" in show_revoke(bulk)
    assert revoke_exit(bulk) == EXIT_NEVER_SEEN
    failed = {**bulk, "progress": {"jobs": {"failed": 1}, "leases": {"live": 1, "ended": 0}}}
    assert revoke_exit(failed) == EXIT_FAILED


def test_progress_counts_the_selection_s_jobs_earlier_ones_included():
    # A selection where 12 instances were terminated before this run and 1 by it: the
    # progress (over the selection's jobs) once said "12/1 done, -11 left".
    radius = {"progress": {"jobs": {"done": 12, "running": 1},
                           "leases": {"live": 1, "ended": 12}}}
    assert _progress_line(radius).startswith("instances 12/13 done, 1 left ·")
    done = {"jobs": {"done": 13}, "leases": {"live": 0, "ended": 13}}
    result = {"terminated": [{"instance_id": "i-new", "leases": 1}], "never_seen": [],
              "counts": {"instances": 1, "leases": 1, "never_seen": 0}, "progress": done}
    assert show_revoke(result).splitlines()[1] == (
        "done: 13 job(s) done, 0 failed; leases 13 ended, 0 still live "
        "(12 of the jobs from earlier terminations)")
    alone = {**result, "progress": {"jobs": {"done": 1}, "leases": {"live": 0, "ended": 1}}}
    assert show_revoke(alone).splitlines()[1] == (
        "done: 1 job(s) done, 0 failed; leases 1 ended, 0 still live")


class Batches:
    """The admin API as ``cmd_revoke`` sees it: a blast radius, then the batches given."""

    def __init__(self, batches):
        self.batches, self.afters = list(batches), []

    def call(self, method, path, body=None):
        if path == "/v1/admin/selection":
            return {"instances": 3, "never_seen": []}
        self.afters.append(body["after"])
        return self.batches.pop(0)


def batch(ids, nxt, remaining):
    return {"terminated": [{"instance_id": i, "job_id": "j-" + i, "leases": 1} for i in ids],
            "never_seen": [], "next": nxt, "counts": {"remaining": remaining}}


def test_what_appears_behind_the_cursor_gets_another_pass():
    """Finding 6: the last batch said 1 left (an instance created behind the cursor); the
    CLI reported success. It now starts again from no cursor."""
    api = Batches([batch(["m1", "m2"], "m2", 2), batch(["m3"], None, 1),
                   batch(["a0"], None, 0)])
    result = cmd_revoke(api, parse("--workload", "w", "--yes", "--reason", "INC"))
    assert api.afters == [None, "m2", None]
    assert [t["instance_id"] for t in result["terminated"]] == ["m1", "m2", "m3", "a0"]
    assert result["counts"]["left"] == 0 and revoke_exit(result) == EXIT_OK


def test_what_is_still_left_after_the_last_pass_is_said_and_fails():
    api = Batches([batch([f"n{i}"], None, 1) for i in range(MAX_PASSES)])
    result = cmd_revoke(api, parse("--workload", "w", "--yes", "--reason", "INC"))
    assert api.afters == [None] * MAX_PASSES and api.batches == []
    assert result["counts"]["left"] == 1 and revoke_exit(result) == EXIT_FAILED
    assert "NOT DONE: 1 instance(s) of the selection" in show_revoke(result)
    assert "lock the workload first" in show_revoke(result)


def test_a_lost_lease_is_not_done_and_exits_1():
    """Vault had forgotten a lease before the broker revoked it: its credential may still
    work, so ``revoke --wait`` says so, names what to end by hand, and exits 1."""
    job = {"job_id": "j-1", "state": "done", "attempts": 1, "last_error": None}
    lost = [{"lease_id": "l-1", "role": "dev-db", "vault_path": "database/creds/dev-db",
             "credential_ref": {"username": "v-dev-db-x"}, "state": "lost"}]
    one = {"instance_id": "i-1", "job": job, "lost": lost}
    shown = show_revoke(one).splitlines()
    assert shown[1].startswith("NOT DONE: 1 lease(s) LOST")
    assert shown[2] == ("  lost  l-1  role dev-db  vault path database/creds/dev-db  "
                        "username=v-dev-db-x")
    assert revoke_exit(one) == EXIT_FAILED
    assert revoke_exit({**one, "lost": []}) == EXIT_OK
    bulk = {"terminated": [{"instance_id": "i-1", "leases": 2}], "never_seen": [],
            "counts": {"instances": 1, "leases": 2, "never_seen": 0},
            "progress": {"jobs": {"done": 1}, "leases": {"live": 0, "ended": 2, "lost": 1}}}
    assert show_revoke(bulk).splitlines()[2].startswith("NOT DONE: 1 lease(s) LOST")
    assert revoke_exit(bulk) == EXIT_FAILED
    clean = {**bulk, "progress": {"jobs": {"done": 1}, "leases": {"live": 0, "ended": 2,
                                                                    "lost": 0}}}
    assert revoke_exit(clean) == EXIT_OK
