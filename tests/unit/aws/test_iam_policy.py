"""The IAM deny policy that stands in for revoking STS sessions: merged per hour, pruned
when expired, bounded by IAM's quota, and only our own unconditional deny counts. Pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.aws import iam_policy as ip

NOW = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)
FOREIGN = {"Sid": "OperatorsOwn", "Effect": "Deny", "Action": "s3:*", "Resource": "*"}


def deny(hour: str, userids: list[str], before: str) -> dict[str, Any]:
    return {
        "Sid": f"BrokerRevoked{hour}",
        "Effect": "Deny",
        "Action": "*",
        "Resource": "*",
        "Condition": {
            "StringEquals": {"aws:userid": userids},
            "DateLessThan": {"aws:TokenIssueTime": before},
        },
    }


def test_a_first_deny_creates_the_policy():
    doc = ip.with_denied(None, "AROA1:i-1", NOW + timedelta(minutes=5), NOW)
    assert doc == {
        "Version": "2012-10-17",
        "Statement": [deny("2026112710", ["AROA1:i-1"], "2026-11-27T10:05:00Z")],
    }
    assert ip.denies(doc, "AROA1:i-1", NOW + timedelta(minutes=5))
    assert not ip.denies(doc, "AROA1:i-1", NOW + timedelta(minutes=6))
    assert not ip.denies(doc, "AROA1:i-2", NOW)


def test_denies_of_one_hour_merge_and_keep_the_latest_time():
    doc = {
        "Version": "2012-10-17",
        "Statement": [FOREIGN, deny("2026112710", ["AROA1:i-1"], "2026-11-27T10:20:00Z")],
    }
    out = ip.with_denied(doc, "AROA1:i-0", NOW + timedelta(minutes=10), NOW)
    assert out["Statement"] == [
        FOREIGN,
        deny("2026112710", ["AROA1:i-0", "AROA1:i-1"], "2026-11-27T10:20:00Z"),
    ]
    later = ip.with_denied(out, "AROA1:i-2", NOW + timedelta(minutes=30), NOW)
    assert later["Statement"][1] == deny(
        "2026112710", ["AROA1:i-0", "AROA1:i-1", "AROA1:i-2"], "2026-11-27T10:30:00Z"
    )
    assert doc["Statement"][1]["Condition"]["StringEquals"]["aws:userid"] == ["AROA1:i-1"]


def test_a_new_hour_adds_a_statement_and_expired_ones_are_dropped():
    doc = {
        "Version": "2012-10-17",
        "Statement": [
            deny("2026112621", ["AROA1:old"], "2026-11-26T21:59:00Z"),  # ended 12h15m+ ago
            deny("2026112622", ["AROA1:recent"], "2026-11-26T22:10:00Z"),
            FOREIGN,
        ],
    }
    out = ip.with_denied(doc, "AROA1:i-3", NOW + timedelta(hours=1), NOW + timedelta(minutes=20))
    assert out["Statement"] == [
        deny("2026112622", ["AROA1:recent"], "2026-11-26T22:10:00Z"),
        FOREIGN,
        deny("2026112711", ["AROA1:i-3"], "2026-11-27T11:00:00Z"),
    ]


def test_a_policy_past_iams_size_quota_is_refused():
    doc = None
    with pytest.raises(ip.PolicyTooLarge):
        for i in range(1000):
            doc = ip.with_denied(doc, f"AROAEXAMPLEEXAMPLE12:i-{i:08d}", NOW, NOW)
    assert doc is not None and ip.size(doc) <= ip.ROLE_POLICY_MAX_CHARS


@pytest.mark.parametrize(
    "stmt",
    [
        {**deny("2026112710", ["AROA1:i-1"], "2026-11-27T10:05:00Z"), "Effect": "Allow"},
        {**deny("2026112710", ["AROA1:i-1"], "2026-11-27T10:05:00Z"), "Action": "s3:*"},
        {**deny("2026112710", ["AROA1:i-1"], "2026-11-27T10:05:00Z"), "Sid": "Other"},
        {
            **deny("2026112710", ["AROA1:i-1"], "2026-11-27T10:05:00Z"),
            "Condition": {
                "StringEquals": {"aws:userid": ["AROA1:i-1"]},
                "DateLessThan": {"aws:TokenIssueTime": "2026-11-27T10:05:00Z"},
                "Bool": {"aws:SecureTransport": "true"},
            },
        },
    ],
    ids=["allow", "narrower-action", "not-ours", "extra-condition"],
)
def test_only_an_unconditional_deny_of_ours_counts_as_in_place(stmt):
    doc = {"Version": "2012-10-17", "Statement": [stmt]}
    assert not ip.denies(doc, "AROA1:i-1", NOW)
