"""Who an admin caller is, decided by pure functions: a static token's operator, a name and
a scope from an operator JWT's verified claims, and the fingerprint a refusal records."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from broker.api.operators import (
    Operator,
    Scope,
    ScopeRule,
    StaticOperator,
    fingerprint,
    fingerprint_key,
    looks_like_jwt,
    operator_name,
    scope_from_claims,
    static_operator,
)


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


OPS = (
    StaticOperator("admin", sha("tok-admin"), Scope.ADMIN),
    StaticOperator("alice", sha("tok-alice"), Scope.READ),
    StaticOperator("bob", sha("tok-bob"), Scope.REVOKE),
)


@pytest.mark.parametrize(("presented", "name"), [
    ("tok-admin", "admin"),
    ("tok-alice", "alice"),
    ("tok-bob", "bob"),
    ("tok-bob ", None),
    ("TOK-BOB", None),
    ("", None),
    (sha("tok-bob"), None),  # the hash itself is not the token
    ("tok-\udcff", None),  # a lone surrogate is hashed, not a crash
], ids=["admin", "alice", "bob", "trailing-space", "case", "empty", "the-hash", "surrogate"])
def test_a_static_token_is_its_operator_or_nobody(presented: str, name: str | None) -> None:
    found = static_operator(presented, OPS)
    assert (found.name if found else None) == name


def test_no_static_operators_means_nobody() -> None:
    assert static_operator("tok-admin", ()) is None


RULES = (
    ScopeRule("groups", "sec-readers", Scope.READ),
    ScopeRule("groups", "sec-oncall", Scope.REVOKE),
    ScopeRule("email", "root@example.org", Scope.ADMIN),
    ScopeRule("level", "3", Scope.ADMIN),
)


@pytest.mark.parametrize(("claims", "scope"), [
    ({"groups": ["sec-readers"]}, Scope.READ),
    ({"groups": ["sec-oncall"]}, Scope.REVOKE),
    ({"groups": ["sec-readers", "sec-oncall"]}, Scope.REVOKE),  # highest match wins
    ({"groups": "sec-oncall"}, Scope.REVOKE),  # a string claim
    ({"groups": ["sec-readers"], "email": "root@example.org"}, Scope.ADMIN),
    ({"level": 3}, Scope.ADMIN),  # a number, as text
    ({"level": True}, None),  # a boolean is not "3"
    ({"groups": ["other"]}, None),
    ({"groups": [{"name": "sec-oncall"}]}, None),  # objects match nothing
    ({"groups": ["SEC-ONCALL"]}, None),  # exact
    ({}, None),
], ids=["read", "revoke", "highest-wins", "string-claim", "admin-by-email", "number",
        "bool", "no-match", "object-items", "case", "no-claims"])
def test_claims_map_to_the_highest_scope_a_rule_grants(
        claims: dict[str, Any], scope: Scope | None) -> None:
    assert scope_from_claims(claims, RULES) == scope


V = {"email_verified": True}


@pytest.mark.parametrize(("claims", "name_claim", "name"), [
    ({"email": "alice@example.org", "sub": "123", **V}, "email", "alice@example.org"),
    ({"email": "alice@example.org", "email_verified": "true"}, "email", "alice@example.org"),
    ({"email": "alice@example.org", "sub": "123"}, "email", None),  # not verified
    ({"email": "alice@example.org", "email_verified": False}, "email", None),
    ({"email": "alice@example.org", "email_verified": "false"}, "email", None),
    ({"email": "alice@example.org", "email_verified": 1}, "email", None),
    ({"sub": "123", **V}, "email", None),  # no fallback to sub
    ({"email": "", "sub": "123", **V}, "email", None),
    ({"email": "a b@example.org", "sub": "123", **V}, "email", None),  # not a printable name
    ({"preferred_username": "alice"}, "preferred_username", "alice"),
    ({"sub": "123"}, "sub", "123"),
    ({"email": 5, **V}, "email", None),
    ({}, "email", None),
    ({"sub": "x" * 200}, "sub", None),
], ids=["email", "verified-as-text", "unverified", "verified-false", "verified-false-text",
        "verified-number", "no-sub-fallback", "empty-email", "spaces", "other-claim",
        "sub-claim", "not-text", "nothing", "too-long"])
def test_an_operator_is_named_by_its_name_claim_alone(
        claims: dict[str, Any], name_claim: str, name: str | None) -> None:
    assert operator_name(claims, name_claim) == name


def test_scopes_nest() -> None:
    reader, revoker, admin = (Operator("x", s) for s in (Scope.READ, Scope.REVOKE, Scope.ADMIN))
    assert [reader.may(s) for s in Scope] == [True, False, False]
    assert [revoker.may(s) for s in Scope] == [True, True, False]
    assert [admin.may(s) for s in Scope] == [True, True, True]
    assert admin.actor == "operator:x"


def test_a_fingerprint_identifies_a_token_without_revealing_it() -> None:
    token = "tok-secret-" + "z" * 30
    fp = fingerprint(token)
    assert fp == fingerprint(token) and fp != fingerprint(token + "1")
    assert fp.startswith("fp:") and len(fp) == 15
    assert token not in fp and sha(token)[:12] not in fp  # not the configuration's hash


def test_a_configured_secret_keys_the_fingerprint() -> None:
    """With audit.hash_key, a fingerprint is not computable from the public tag alone, and
    differs between deployments."""
    token = "tok-secret-" + "z" * 30
    keyed = fingerprint(token, fingerprint_key(b"k" * 32))
    assert keyed != fingerprint(token) and keyed != fingerprint(token, fingerprint_key(b"j" * 32))
    assert keyed == fingerprint(token, fingerprint_key(b"k" * 32))
    assert fingerprint(token, fingerprint_key(None)) == fingerprint(token)


@pytest.mark.parametrize(("presented", "jwt"), [
    ("a.b.c", True), ("a.b.", True), ("a..c", False), ("abc", False), ("a.b.c.d", False),
], ids=["three", "unsigned", "empty-payload", "opaque", "four"])
def test_what_looks_like_a_jwt(presented: str, jwt: bool) -> None:
    assert looks_like_jwt(presented) is jwt
