"""Which lock refuses a request: pure, exhaustive over kinds, claim shapes and lifetimes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.leases.locks import LockSubject, claim_matches, is_active, matches, refusing_lock
from broker.leases.views import LockView

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
SUBJECT = LockSubject(
    issuer="dev", workload="payments", role="dev-db",
    claims={"groups": ["a", "b"], "env": "prod", "run": 42, "ci": True,
            "kubernetes.io": {"namespace": "shop"}, "nested": {"team": "red"}},
)


def lock(kind: str, value: str, claim: str | None = None, *, lock_id: str = "k-1",
         created: datetime = NOW - timedelta(hours=1), expires: datetime | None = None,
         removed: datetime | None = None) -> LockView:
    return LockView(lock_id, kind, value, claim, "why", None, "operator:x", created, expires,
                    removed, "operator:x" if removed else None)


@pytest.mark.parametrize(("the_lock", "hit"), [
    (lock("workload", "payments"), True),
    (lock("workload", "Payments"), False),
    (lock("workload", "payments-2"), False),
    (lock("issuer", "dev"), True),
    (lock("issuer", "other"), False),
    (lock("role", "dev-db"), True),
    (lock("role", "dev-cert"), False),
    (lock("claim", "a", "groups"), True),  # a list holding the value
    (lock("claim", "c", "groups"), False),
    (lock("claim", "prod", "env"), True),
    (lock("claim", "dev", "env"), False),
    (lock("claim", "42", "run"), True),  # a number, as text
    (lock("claim", "true", "ci"), True),  # a boolean, as JSON text
    (lock("claim", "True", "ci"), False),
    (lock("claim", "red", "nested.team"), True),  # a dotted path
    (lock("claim", "shop", "kubernetes.io.namespace"), True),
    (lock("claim", "x", "missing"), False),
    (lock("claim", "payments", None), False),  # a claim lock without a claim matches nothing
    (lock("instance", "payments"), False),  # an unknown kind matches nothing
], ids=["workload", "workload-case", "workload-prefix", "issuer", "issuer-other", "role",
        "role-other", "claim-list", "claim-list-miss", "claim-string", "claim-string-miss",
        "claim-number", "claim-bool", "claim-bool-case", "claim-nested", "claim-dotted-key",
        "claim-missing", "claim-unnamed", "unknown-kind"])
def test_a_lock_matches_exactly_what_it_names(the_lock: LockView, hit: bool) -> None:
    assert matches(the_lock, SUBJECT) is hit


@pytest.mark.parametrize(("claims", "name", "value", "hit"), [
    ({"k.v": "1", "k": {"v": "2"}}, "k.v", "1", True),  # the top-level name first
    ({"k.v": "1", "k": {"v": "2"}}, "k.v", "2", False),
    ({"g": [["a"]]}, "g", "a", False),  # nested lists are not flattened
    ({"g": {"a": 1}}, "g", "a", False),
    ({"g": None}, "g", "None", False),
], ids=["top-level-wins", "top-level-shadows", "nested-list", "object", "null"])
def test_claim_shapes(claims: dict[str, Any], name: str, value: str, hit: bool) -> None:
    assert claim_matches(claims, name, value) is hit


@pytest.mark.parametrize(("the_lock", "active"), [
    (lock("role", "x"), True),
    (lock("role", "x", expires=NOW + timedelta(seconds=1)), True),
    (lock("role", "x", expires=NOW), False),  # expiry is exclusive
    (lock("role", "x", expires=NOW - timedelta(seconds=1)), False),
    (lock("role", "x", removed=NOW - timedelta(seconds=1)), False),
], ids=["forever", "until-later", "expires-now", "expired", "removed"])
def test_a_lock_is_active_until_removed_or_expired(the_lock: LockView, active: bool) -> None:
    assert is_active(the_lock, NOW) is active


def test_the_oldest_active_matching_lock_refuses() -> None:
    older = lock("role", "dev-db", lock_id="k-b", created=NOW - timedelta(hours=2))
    newer = lock("workload", "payments", lock_id="k-a")
    gone = lock("issuer", "dev", lock_id="k-0", created=NOW - timedelta(days=1), removed=NOW)
    other = lock("role", "dev-cert", lock_id="k-c", created=NOW - timedelta(days=2))
    assert refusing_lock([newer, other, gone, older], SUBJECT, NOW) == older
    assert refusing_lock([other, gone], SUBJECT, NOW) is None
    assert refusing_lock([], SUBJECT, NOW) is None
