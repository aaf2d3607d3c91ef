"""What ``policy explain`` counts as a refusal: the policy's decision and the instance's
tombstone (locks add theirs through the service's explain checks). Pure."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from broker.policy.explain import decision_refusal, instance_refusal

AT = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize("state,since,by,expected", [
    (None, None, None, None),
    ("active", None, None, None),
    ("terminating", AT, "operator:alice", {
        "code": "instance_terminated", "state": "terminating",
        "message": "instance i-1 is terminating: the broker issues and renews nothing for it",
        "since": "2026-12-02T10:00:00Z", "by": "operator:alice"}),
    ("terminated", AT, "events:kubernetes", {
        "code": "instance_terminated", "state": "terminated",
        "message": "instance i-1 is terminated: the broker issues and renews nothing for it",
        "since": "2026-12-02T10:00:00Z", "by": "events:kubernetes"}),
    ("terminated", None, None, {
        "code": "instance_terminated", "state": "terminated",
        "message": "instance i-1 is terminated: the broker issues and renews nothing for it",
        "since": None, "by": None}),
], ids=["never_seen", "active", "terminating", "terminated", "terminated_without_job"])
def test_an_instance_refuses_unless_active_or_never_seen(state, since, by, expected):
    assert instance_refusal("i-1", state, since=since, by=by) == expected


@pytest.mark.parametrize("decision,expected", [
    ({"allowed": True, "code": None, "reason": "rule 'r' allows role 'x'"}, None),
    ({"allowed": False, "code": "role_not_permitted", "reason": "no rule applies"},
     {"code": "role_not_permitted", "message": "no rule applies"}),
    ({"allowed": False, "code": "template_value_refused", "reason": "bad CN"},
     {"code": "template_value_refused", "message": "bad CN"}),
], ids=["granted", "no_rule", "template"])
def test_a_decision_refuses_when_not_allowed(decision, expected):
    assert decision_refusal(decision) == expected
