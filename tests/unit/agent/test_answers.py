"""Reading the broker's answers: the documented shapes become the agent's values, and
anything else is unreadable with the field named (never a value)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from broker.agent import answers
from broker.agent.answers import AnswerUnreadable, Renewal
from broker.agent.state import Lease

NOW = datetime(2030, 1, 1, 12, 0, 5, tzinfo=UTC)
LEASE_ID = "l-" + "f" * 32
CREDENTIAL = {"lease_id": LEASE_ID, "instance_id": "uid", "workload": "ns/sa", "role": "db",
              "kind": "database_login", "data": {"username": "u", "password": "secret-pw"},
              "issued_at": "2030-01-01T12:00:00Z", "expires_at": "2030-01-01T12:10:00Z",
              "renewable": True, "leased": True}


def test_issued() -> None:
    lease, issued = answers.issued(CREDENTIAL, NOW)
    assert lease == Lease(LEASE_ID, True, True, datetime(2030, 1, 1, 12, tzinfo=UTC),
                          datetime(2030, 1, 1, 12, 10, tzinfo=UTC), NOW)
    assert (issued.kind, dict(issued.data), issued.expires_at) == (
        "database_login", CREDENTIAL["data"], lease.expires_at)


@pytest.mark.parametrize(("changes", "flags"), [
    ({"leased": False, "renewable": False}, (False, False)),
    ({"renewable": "yes"}, (True, False)),
    ({"leased": None}, (True, True)),
], ids=["ssh-certificate", "non-boolean-renewable", "leased-null"])
def test_issued_flags(changes: dict[str, Any], flags: tuple[bool, bool]) -> None:
    lease, _ = answers.issued({**CREDENTIAL, **changes}, NOW)
    assert (lease.leased, lease.renewable) == flags


@pytest.mark.parametrize(("changes", "message"), [
    ({"lease_id": None}, "no lease_id"),
    ({"lease_id": "l-../../sys/raw"}, "no lease_id"),
    ({"kind": None}, "no kind or data"),
    ({"data": ["x"]}, "no kind or data"),
    ({"expires_at": None}, "no expires_at"),
    ({"expires_at": "later"}, "expires_at is not a time"),
    ({"issued_at": "2030-01-01T12:00:00"}, "issued_at has no time zone"),
], ids=["no-id", "id-path", "no-kind", "data-list", "no-expiry", "expiry-words", "no-zone"])
def test_issued_unreadable(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(AnswerUnreadable) as err:
        answers.issued({**CREDENTIAL, **changes}, NOW)
    assert str(err.value) == message


def test_renewal() -> None:
    body = {"lease_id": LEASE_ID, "expires_at": "2030-01-01T12:20:00Z", "renewable": True,
            "max_expires_at": "2030-01-01T13:00:00Z", "near_max_ttl": False}
    assert answers.renewal(body) == Renewal(datetime(2030, 1, 1, 12, 20, tzinfo=UTC), True,
                                            datetime(2030, 1, 1, 13, tzinfo=UTC), False)
    assert answers.renewal({"expires_at": "2030-01-01T12:20:00+00:00", "near_max_ttl": True}) == (
        Renewal(datetime(2030, 1, 1, 12, 20, tzinfo=UTC), False, None, True))
    with pytest.raises(AnswerUnreadable, match="^no expires_at$"):
        answers.renewal({})
    with pytest.raises(AnswerUnreadable, match="max_expires_at is not a time"):
        answers.renewal({"expires_at": "2030-01-01T12:20:00Z", "max_expires_at": "x"})
