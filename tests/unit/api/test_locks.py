"""A role or issuer lock must name something that can match (finding 8a): the pure check
the admin service runs before a lock is written."""

from __future__ import annotations

import pytest

from broker.api.locks import NAMES_SHOWN, check_lock_target
from broker.errors import BadRequest

ROLES = ["dev-cert", "dev-db", "payments-db"]
ISSUERS = {"dev": "https://dev.example/", "k8s": "https://k8s.example"}


@pytest.mark.parametrize(("kind", "value"), [
    ("role", "payments-db"), ("issuer", "k8s"), ("workload", "anything"),
    ("claim", "anything"),
], ids=["role", "issuer", "workload-unchecked", "claim-unchecked"])
def test_what_can_match_is_accepted(kind: str, value: str) -> None:
    check_lock_target(kind, value, roles=ROLES, issuers=ISSUERS)


@pytest.mark.parametrize(("kind", "value", "message"), [
    ("role", "Payments DB", "no role 'Payments DB' is configured (a role name is lower-case"),
    ("role", "payments", "no role 'payments' is configured; configured roles: dev-cert, dev-db, "
                         "payments-db"),
    ("role", "DEV-CERT", "(a role name is lower-case"),
    ("issuer", "https://k8s.example", "that is the URL of issuer 'k8s': lock its name"),
    ("issuer", "https://dev.example", "that is the URL of issuer 'dev': lock its name"),
    ("issuer", "prod", "no issuer named 'prod'; configured issuers: dev, k8s"),
], ids=["role-spaces", "role-unknown", "role-case", "issuer-url", "issuer-url-slash",
        "issuer-unknown"])
def test_a_lock_that_could_never_match_is_refused(kind: str, value: str, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        check_lock_target(kind, value, roles=ROLES, issuers=ISSUERS)
    assert info.value.code == "invalid_lock" and message in info.value.message


def test_many_names_are_shown_in_part() -> None:
    roles = [f"r{i:03d}" for i in range(NAMES_SHOWN + 5)]
    with pytest.raises(BadRequest) as info:
        check_lock_target("role", "x", roles=roles, issuers={})
    assert f"({NAMES_SHOWN + 5} in all)" in info.value.message
    assert "r019" in info.value.message and "r020" not in info.value.message
