"""Policy rules: matchers, rule applicability, deny by default, first-match-wins, TTL caps."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from broker.engines.role import RoleSettings
from broker.identity.model import Identity
from broker.policy.rules import Decision, decide, rules_applying
from broker.policy.settings import ClaimMatch, Rule

CLAIMS: dict[str, Any] = {
    "sub": "system:serviceaccount:payments:api",
    "kubernetes.io": {"namespace": "payments", "pod": {"name": "api-7f9c"}},
    "a.b": "dotted-key",
    "groups": ["payments", "admins"],
    "meta": {"team": "payments"},
    "admin": True,
    "disabled": False,
    "count": 42,
    "ratio": 1.5,
    "nullish": None,
}


def make_identity(**overrides: Any) -> Identity:
    fields: dict[str, Any] = {
        "issuer_name": "dev",
        "issuer": "https://issuer.example",
        "subject": "system:serviceaccount:payments:api",
        "instance_id": "i-123",
        "workload": "payments",
        "issued_at": datetime(2024, 1, 1, tzinfo=UTC),
        "expires_at": datetime(2024, 1, 1, 1, tzinfo=UTC),
        "claims": CLAIMS,
    }
    fields.update(overrides)
    return Identity(**fields)


def cond(**kw: Any) -> ClaimMatch:
    return ClaimMatch.model_validate(kw)


def rule(name: str, allow: list[str], *, issuer: str | None = None,
         match: list[dict[str, Any]] | None = None, max_ttl: Any = None) -> Rule:
    return Rule.model_validate({"name": name, "allow": allow, "issuer": issuer,
                                "match": match or [], "max_ttl": max_ttl})


def condition_holds(identity: Identity, condition: ClaimMatch) -> bool:
    """Whether one condition holds, asked as the broker asks it: of a rule that has it alone."""
    only = Rule(name="r", allow=["cert"], match=[condition])
    return rules_applying(identity, [only]) == ["r"]


# ---------------------------------------------------------------------------------------------
# condition_holds
# ---------------------------------------------------------------------------------------------

MATCHER_CASES = [
    # identity: exact
    ({"identity": "workload", "exact": "payments"}, True, "identity-exact-equal"),
    ({"identity": "workload", "exact": "Payments"}, False, "identity-exact-case-sensitive"),
    ({"identity": "workload", "exact": "payment"}, False, "identity-exact-prefix-no"),
    ({"identity": "workload", "exact": "payments "}, False, "identity-exact-trailing-space-no"),
    ({"identity": "instance_id", "exact": "i-123"}, True, "identity-instance-exact"),
    ({"identity": "subject", "exact": "system:serviceaccount:payments:api"}, True,
     "identity-subject-exact"),
    # identity: glob
    ({"identity": "workload", "glob": "pay*"}, True, "glob-star"),
    ({"identity": "workload", "glob": "pay?ents"}, True, "glob-question"),
    ({"identity": "workload", "glob": "[p]ayments"}, True, "glob-class"),
    ({"identity": "workload", "glob": "PAY*"}, False, "glob-case-sensitive"),
    ({"identity": "workload", "glob": "pay"}, False, "glob-no-implicit-star"),
    ({"identity": "workload", "glob": "*-prod"}, False, "glob-suffix-no"),
    ({"identity": "subject", "glob": "system:serviceaccount:*"}, True, "glob-subject"),
    ({"identity": "instance_id", "glob": "j-*"}, False, "glob-instance-no"),
    # identity: regex (fullmatch)
    ({"identity": "workload", "regex": "pay"}, False, "regex-pay-not-payments"),
    ({"identity": "workload", "regex": "ments"}, False, "regex-suffix-not-search"),
    ({"identity": "workload", "regex": "pay.*"}, True, "regex-dotstar"),
    ({"identity": "workload", "regex": "payments|billing"}, True, "regex-alternation-first"),
    ({"identity": "workload", "regex": "billing|pay"}, False, "regex-alternation-partial"),
    ({"identity": "workload", "regex": "p[a-z]+s"}, True, "regex-class"),
    ({"identity": "workload", "regex": "PAYMENTS"}, False, "regex-case-sensitive"),
    ({"identity": "instance_id", "regex": r"i-\d+"}, True, "regex-instance"),
    # identity: one_of
    ({"identity": "workload", "one_of": ["billing", "payments"]}, True, "one-of-member"),
    ({"identity": "workload", "one_of": ["billing"]}, False, "one-of-not-member"),
    ({"identity": "workload", "one_of": ["pay", "ments"]}, False, "one-of-no-substring"),
    ({"identity": "workload", "one_of": []}, False, "one-of-empty"),
    # nested claim paths
    ({"claim": ["kubernetes.io", "namespace"], "exact": "payments"}, True, "claim-nested-exact"),
    ({"claim": ["kubernetes.io", "namespace"], "exact": "billing"}, False,
     "claim-nested-exact-other"),
    ({"claim": ["kubernetes.io", "pod", "name"], "glob": "api-*"}, True, "claim-deep-glob"),
    ({"claim": ["kubernetes.io", "namespace"], "regex": "pay"}, False, "claim-nested-regex-full"),
    ({"claim": ["kubernetes.io", "namespace"], "one_of": ["payments", "x"]}, True,
     "claim-nested-one-of"),
    ({"claim": "sub", "glob": "system:serviceaccount:payments:*"}, True, "claim-top-string"),
    ({"claim": "a.b", "exact": "dotted-key"}, True, "claim-dotted-name-not-split"),
    ({"claim": ["a", "b"], "regex": ".*"}, False, "claim-split-path-absent"),
    ({"claim": "count", "exact": "42"}, True, "claim-int-as-text"),
    # claims that are not a string never match, even a match-everything condition
    ({"claim": "groups", "regex": ".*"}, False, "claim-list-regex-any"),
    ({"claim": "groups", "exact": "['payments', 'admins']"}, False, "claim-list-exact-repr"),
    ({"claim": "groups", "one_of": ["payments"]}, False, "claim-list-one-of-element"),
    ({"claim": "groups", "glob": "*"}, False, "claim-list-glob-any"),
    ({"claim": "meta", "regex": ".*"}, False, "claim-dict-regex-any"),
    ({"claim": "meta", "exact": "{'team': 'payments'}"}, False, "claim-dict-exact-repr"),
    ({"claim": ["kubernetes.io"], "glob": "*"}, False, "claim-nested-dict-glob-any"),
    ({"claim": "admin", "exact": "True"}, False, "claim-bool-true-exact"),
    ({"claim": "admin", "regex": ".*"}, False, "claim-bool-true-regex-any"),
    ({"claim": "disabled", "one_of": ["False", "0", ""]}, False, "claim-bool-false-one-of"),
    ({"claim": "nullish", "regex": ".*"}, False, "claim-null-regex-any"),
    ({"claim": "nullish", "exact": "None"}, False, "claim-null-exact-None"),
    ({"claim": "absent", "regex": ".*"}, False, "claim-absent-regex-any"),
    ({"claim": "absent", "glob": "*"}, False, "claim-absent-glob-any"),
    ({"claim": ["kubernetes.io", "missing"], "regex": ".*"}, False, "claim-nested-absent"),
    ({"claim": ["sub", "deeper"], "regex": ".*"}, False, "claim-path-through-string"),
    ({"claim": ["groups", "0"], "exact": "payments"}, False, "claim-path-through-list"),
]


@pytest.mark.parametrize(("spec", "expected"), [(s, e) for s, e, _ in MATCHER_CASES],
                         ids=[i for _, _, i in MATCHER_CASES])
def test_condition_holds(spec: dict[str, Any], expected: bool) -> None:
    assert condition_holds(make_identity(), cond(**spec)) is expected


@pytest.mark.parametrize(
    ("workload", "expected"),
    [("payments", False), ("pay", True), ("xpay", False), ("payx", False)],
    ids=["longer-value", "exact-value", "prefixed", "suffixed"],
)
def test_regex_is_fullmatch_on_identity(workload: str, expected: bool) -> None:
    assert condition_holds(make_identity(workload=workload),
                           cond(identity="workload", regex="pay")) is expected


def test_regex_anchors_in_pattern_do_not_allow_partial() -> None:
    # An author writing "^pay" still gets full-match semantics, not a prefix match.
    assert condition_holds(make_identity(), cond(identity="workload", regex="^pay")) is False


# ---------------------------------------------------------------------------------------------
# rules_applying
# ---------------------------------------------------------------------------------------------

NS = {"claim": ["kubernetes.io", "namespace"], "exact": "payments"}
WL = {"identity": "workload", "glob": "pay*"}
WL_NO = {"identity": "workload", "exact": "billing"}

RULE_APPLIES_CASES = [
    (None, [], True, "no-issuer-no-conditions"),
    ("dev", [], True, "issuer-matches-name"),
    ("other", [], False, "issuer-differs"),
    ("https://issuer.example", [], False, "issuer-url-is-not-issuer-name"),
    ("Dev", [], False, "issuer-case-sensitive"),
    (None, [NS], True, "single-condition-holds"),
    (None, [NS, WL], True, "all-conditions-hold"),
    (None, [NS, WL_NO], False, "one-condition-fails"),
    (None, [WL_NO, NS], False, "first-condition-fails"),
    ("dev", [NS, WL], True, "issuer-and-conditions"),
    ("other", [NS, WL], False, "conditions-hold-issuer-differs"),
]


@pytest.mark.parametrize(("issuer", "match", "expected"),
                         [(a, b, c) for a, b, c, _ in RULE_APPLIES_CASES],
                         ids=[i for *_, i in RULE_APPLIES_CASES])
def test_rules_applying(issuer: str | None, match: list[dict[str, Any]], expected: bool) -> None:
    applying = rules_applying(make_identity(), [rule("r", ["cert"], issuer=issuer, match=match)])
    assert applying == (["r"] if expected else [])


# ---------------------------------------------------------------------------------------------
# decide
# ---------------------------------------------------------------------------------------------

ROLES = {
    "cert": RoleSettings.model_validate(
        {"engine": "pki", "mount": "pki", "vault_role": "cert", "default_ttl": "10m",
         "max_ttl": "1h", "params": {"common_name": "{workload}.workload.internal"}}),
    "db": RoleSettings.model_validate(
        {"engine": "database", "mount": "database", "vault_role": "db", "default_ttl": "5m",
         "max_ttl": "15m"}),
}

OTHER_ISSUER = rule("other-issuer", ["cert", "db"], issuer="other")
BILLING_ONLY = rule("billing-only", ["cert", "db"], match=[WL_NO])
DB_ONLY = rule("payments-db", ["db"], match=[NS])
CERT_SHORT = rule("payments-cert-short", ["cert"], match=[WL], max_ttl="2m")
CERT_ANY = rule("everyone-cert", ["cert"])

DECIDE_CASES = [
    ([], "cert", None,
     Decision(False, "cert", None, "no rule applies to this identity (deny by default)", 0),
     "no-rules-deny-by-default"),
    ([OTHER_ISSUER, BILLING_ONLY], "cert", None,
     Decision(False, "cert", None, "no rule applies to this identity (deny by default)", 0),
     "no-rule-applies-deny-by-default"),
    ([CERT_ANY], "nope", None,
     Decision(False, "nope", None, "role 'nope' does not exist", 0),
     "unknown-role-even-with-permissive-rule"),
    ([], "nope", 60,
     Decision(False, "nope", None, "role 'nope' does not exist", 0),
     "unknown-role-no-rules"),
    ([DB_ONLY], "cert", None,
     Decision(False, "cert", None,
              "rules 'payments-db' apply to this identity but none allows role 'cert'", 0),
     "applies-but-not-allowed-names-rule"),
    ([OTHER_ISSUER, DB_ONLY, rule("also-db", ["db"])], "cert", None,
     Decision(False, "cert", None,
              "rules 'payments-db', 'also-db' apply to this identity but none allows role 'cert'",
              0),
     "several-apply-none-allow-names-only-applying"),
    ([OTHER_ISSUER, DB_ONLY, CERT_SHORT, CERT_ANY], "cert", None,
     Decision(True, "cert", "payments-cert-short",
              "rule 'payments-cert-short' allows role 'cert' (ttl capped at 120s)", 120),
     "first-applicable-allowing-rule-wins"),
    ([OTHER_ISSUER, DB_ONLY, CERT_ANY, CERT_SHORT], "cert", None,
     Decision(True, "cert", "everyone-cert",
              "rule 'everyone-cert' allows role 'cert' (ttl capped at 3600s)", 600),
     "order-matters-permissive-first"),
    ([BILLING_ONLY, CERT_ANY], "cert", 60,
     Decision(True, "cert", "everyone-cert",
              "rule 'everyone-cert' allows role 'cert' (ttl capped at 3600s)", 60),
     "skips-non-applying-rule-allowing-role"),
    ([OTHER_ISSUER, DB_ONLY, CERT_SHORT], "db", 60,
     Decision(True, "db", "payments-db",
              "rule 'payments-db' allows role 'db' (ttl capped at 900s)", 60),
     "db-role-from-db-rule"),
]


@pytest.mark.parametrize(("rules", "role", "ttl", "expected"),
                         [(a, b, c, d) for a, b, c, d, _ in DECIDE_CASES],
                         ids=[i for *_, i in DECIDE_CASES])
def test_decide(rules: list[Rule], role: str, ttl: int | None, expected: Decision) -> None:
    assert decide(make_identity(), role, ttl, roles=ROLES, rules=rules) == expected


def test_deny_by_default_reason_mentions_it() -> None:
    d = decide(make_identity(), "cert", None, roles=ROLES, rules=[])
    assert not d.allowed
    assert "deny by default" in d.reason


def test_rule_for_another_issuer_does_not_grant() -> None:
    d = decide(make_identity(issuer_name="k8s"), "cert", None, roles=ROLES,
               rules=[rule("dev-only", ["cert"], issuer="dev")])
    assert d == Decision(False, "cert", None,
                         "no rule applies to this identity (deny by default)", 0)


# role cert: default 600, max 3600
TTL_CASES = [
    (None, None, 600, 3600, "default-when-none-requested"),
    (60, None, 60, 3600, "requested-below-caps"),
    (3600, None, 3600, 3600, "requested-equal-role-max"),
    (3601, None, 3600, 3600, "requested-capped-by-role-max"),
    (10**9, None, 3600, 3600, "huge-request-capped"),
    (10**9, "15m", 900, 900, "rule-max-smaller-than-role-max"),
    (10**9, "2h", 3600, 3600, "role-max-smaller-than-rule-max"),
    (None, "2m", 120, 120, "default-capped-by-rule-max"),
    (None, "2h", 600, 3600, "default-below-both"),
    (300, "2m", 120, 120, "requested-capped-by-rule-max"),
    (100, "2m", 100, 120, "requested-below-rule-max"),
    (1, None, 1, 3600, "one-second"),
    (0, None, 1, 3600, "zero-raised-to-one"),
    (-5, None, 1, 3600, "negative-raised-to-one"),
    # A rule max_ttl of 0 is now refused at load (test_config.py rule-max-ttl-zero); the
    # smallest rule cap, 1s, still grants 1s.
    (None, 1, 1, 1, "smallest-rule-cap-one-second"),
    (3600, "1s", 1, 1, "request-capped-by-one-second-rule-cap"),
]


@pytest.mark.parametrize(("requested", "rule_max", "expected_ttl", "expected_cap"),
                         [(a, b, c, d) for a, b, c, d, _ in TTL_CASES],
                         ids=[i for *_, i in TTL_CASES])
def test_decide_ttl(requested: int | None, rule_max: Any, expected_ttl: int,
                    expected_cap: int) -> None:
    d = decide(make_identity(), "cert", requested, roles=ROLES,
               rules=[rule("r", ["cert"], max_ttl=rule_max)])
    assert d == Decision(True, "cert", "r",
                         f"rule 'r' allows role 'cert' (ttl capped at {expected_cap}s)",
                         expected_ttl)
