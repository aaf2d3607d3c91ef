"""The inline deny policy that stands in for revoking STS sessions. Pure.

AWS cannot revoke an STS session; its documented mitigation is a deny on the role for
sessions issued before a time (``aws:TokenIssueTime``). The broker scopes that deny to the
terminated instances' sessions (``aws:userid`` is ``<role id>:<session name>``), in one
inline policy per role that it owns:

    {"Sid": "BrokerRevoked2026112621", "Effect": "Deny", "Action": "*", "Resource": "*",
     "Condition": {"StringEquals": {"aws:userid": ["AROA…:i-1", "AROA…:i-2"]},
                   "DateLessThan": {"aws:TokenIssueTime": "2026-11-26T21:40:00Z"}}}

One statement per hour in which sessions were denied, its time the latest of that hour:
every session named in it belongs to a tombstoned instance, so moving its time later
denies nothing that should live. A statement is dropped once no session it could match can
still be valid (STS sessions last at most 12 hours), which bounds the policy's size; IAM
allows 10,240 characters of inline policy per role, roughly 200 denied sessions per
role per 13 hours. Statements the broker does not own (other Sids) are left as they are.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.aws import iso_seconds

VERSION = "2012-10-17"
SID_PREFIX = "BrokerRevoked"
_OUR_SID = re.compile(rf"^{SID_PREFIX}(\d{{10}})\Z")
# The longest an STS session can live (AssumeRole* with a role's maximum), plus margin:
# after that, no session issued within a statement's hour can still be valid.
MAX_SESSION = timedelta(hours=12, minutes=15)
ROLE_POLICY_MAX_CHARS = 10_240  # IAM's quota for a role's inline policies, whitespace excluded


class PolicyTooLarge(ValueError):
    pass


def _statements(doc: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    if not doc:
        return []
    stmts = doc.get("Statement", [])
    if isinstance(stmts, Mapping):
        stmts = [stmts]
    return [copy.deepcopy(dict(s)) for s in stmts if isinstance(s, Mapping)]


def _hour(sid: Any) -> datetime | None:
    m = _OUR_SID.match(sid) if isinstance(sid, str) else None
    if m is None:
        return None
    try:
        return datetime.strptime(m.group(1), "%Y%m%d%H").replace(tzinfo=UTC)
    except ValueError:
        return None


def _userids(stmt: Mapping[str, Any]) -> list[str]:
    value = stmt.get("Condition", {}).get("StringEquals", {}).get("aws:userid", [])
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _issue_before(stmt: Mapping[str, Any]) -> str:
    return str(stmt.get("Condition", {}).get("DateLessThan", {}).get("aws:TokenIssueTime", ""))


def deny_statement(hour: datetime, userids: list[str], before: datetime) -> dict[str, Any]:
    return {
        "Sid": f"{SID_PREFIX}{hour:%Y%m%d%H}",
        "Effect": "Deny",
        "Action": "*",
        "Resource": "*",
        "Condition": {
            "StringEquals": {"aws:userid": sorted(set(userids))},
            "DateLessThan": {"aws:TokenIssueTime": iso_seconds(before)},
        },
    }


def with_denied(
    doc: Mapping[str, Any] | None, userid: str, before: datetime, now: datetime
) -> dict[str, Any]:
    """``doc`` plus a deny of ``userid``'s sessions issued before ``before``, without the
    broker's statements that can no longer match a valid session."""
    hour = before.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    kept: list[dict[str, Any]] = []
    merged = False
    for stmt in _statements(doc):
        at = _hour(stmt.get("Sid"))
        if at is None:
            kept.append(stmt)  # not ours
            continue
        if at + timedelta(hours=1) + MAX_SESSION < now:
            continue  # every session it names has expired
        if at == hour:
            later = max(_issue_before(stmt), iso_seconds(before))  # same format: sortable
            stmt = deny_statement(hour, [*_userids(stmt), userid], before)
            stmt["Condition"]["DateLessThan"]["aws:TokenIssueTime"] = later
            merged = True
        kept.append(stmt)
    if not merged:
        kept.append(deny_statement(hour, [userid], before))
    out = {"Version": VERSION, "Statement": kept}
    if size(out) > ROLE_POLICY_MAX_CHARS:
        raise PolicyTooLarge(
            f"the deny policy would exceed IAM's {ROLE_POLICY_MAX_CHARS} characters per role"
        )
    return out


def denies(doc: Mapping[str, Any] | None, userid: str, before: datetime) -> bool:
    """Whether ``doc`` denies every request of ``userid``'s sessions issued before
    ``before``."""
    want = iso_seconds(before)
    for stmt in _statements(doc):
        if (
            _hour(stmt.get("Sid")) is not None
            and stmt.get("Effect") == "Deny"
            and stmt.get("Action") == "*"
            and stmt.get("Resource") == "*"
            and set(stmt.get("Condition", {})) == {"StringEquals", "DateLessThan"}
            and userid in _userids(stmt)
            and _issue_before(stmt) >= want
        ):
            return True
    return False


def size(doc: Mapping[str, Any]) -> int:
    """Characters IAM counts: the JSON without whitespace."""
    return len(json.dumps(doc, separators=(",", ":")))


def encode(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), sort_keys=False)
