"""The policy preview: claims a token would carry → the issuer's claim mapping → a verdict
per role, with the rule that granted it or the code issuance would refuse with. Pure."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from broker.engines.role import RoleSettings
from broker.errors import BadRequest
from broker.identity.settings import IssuerSettings
from broker.policy.explain import preview, preview_identity
from broker.policy.settings import Rule

K8S = IssuerSettings(name="k8s-prod", issuer="https://k8s.example", kind="kubernetes",
                     jwks_uri="https://k8s.example/jwks")
GENERIC = IssuerSettings(name="ci", issuer="https://ci.example", jwks_uri="https://ci.example/j",
                         instance_claim="run", workload_claim="repo")


def role(params: dict[str, str] | None = None, **kw: Any) -> RoleSettings:
    return RoleSettings.model_validate({"engine": "pki", "mount": "pki", "vault_role": "r",
                                        "default_ttl": "10m", "max_ttl": "1h",
                                        "params": params or {}, **kw})


AUDIENCE = "ephemeral-broker"
ROLES = {
    "db": RoleSettings.model_validate({"engine": "database", "mount": "database",
                                       "vault_role": "db", "default_ttl": "5m",
                                       "max_ttl": "15m"}),
    "cert-by-workload": role({"common_name": "{workload}.svc"}),
    "cert-by-instance": role({"common_name": "{instance_id}.pods"}),
    "cert-by-issuer": role({"common_name": "{issuer_name}.issuers"}),
    "secret": RoleSettings.model_validate({"engine": "database", "mount": "database",
                                           "vault_role": "reports"}),
}


def rule(name: str, allow: list[str], **kw: Any) -> Rule:
    return Rule.model_validate({"name": name, "allow": allow, **kw})


RULES = (
    rule("payments-db", ["db", "cert-by-workload", "cert-by-instance"], issuer="k8s-prod",
         match=[{"claim": ["kubernetes.io", "namespace"], "exact": "payments"}],
         max_ttl="10m"),
    rule("billing-sa", ["secret"], issuer="k8s-prod",
         match=[{"identity": "workload", "glob": "billing/*"}]),
    rule("ci-certs", ["cert-by-issuer", "cert-by-instance"], issuer="ci",
         match=[{"identity": "workload", "regex": "org-[a-z]+"}]),
)


def pod(namespace: str = "payments", sa: str = "api", **extra: Any) -> dict[str, Any]:
    """The claims of a projected token for a pod not created yet: no pod uid."""
    return {"sub": f"system:serviceaccount:{namespace}:{sa}",
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": sa}, **extra}}


def run(issuer: IssuerSettings, claims: dict[str, Any], roles: list[str],
        ttl: int | None = None) -> dict[str, Any]:
    return preview(issuer, claims, roles, ttl, roles=ROLES, rules=RULES, audience=AUDIENCE)


def verdict(role_name: str, granted: bool, code: str | None, reason: str, rule_name: str | None,
            ttl: int | None) -> dict[str, Any]:
    return {"role": role_name, "granted": granted, "code": code, "reason": reason,
            "rule": rule_name, "ttl": ttl}


NO_RULE = "no rule applies to this identity (deny by default)"
CASES = [
    # (issuer, claims, role, ttl, expected verdict)
    (K8S, pod(), "db", None,
     verdict("db", True, None, "rule 'payments-db' allows role 'db' (ttl capped at 600s)",
             "payments-db", 300)),
    (K8S, pod(), "db", 3600,
     verdict("db", True, None, "rule 'payments-db' allows role 'db' (ttl capped at 600s)",
             "payments-db", 600)),
    (K8S, pod(), "db", 60,
     verdict("db", True, None, "rule 'payments-db' allows role 'db' (ttl capped at 600s)",
             "payments-db", 60)),
    (K8S, pod(namespace="shop"), "db", None, verdict("db", False, "role_not_permitted",
                                                     NO_RULE, None, None)),
    (K8S, pod(), "secret", None,
     verdict("secret", False, "role_not_permitted",
             "rules 'payments-db' apply to this identity but none allows role 'secret'",
             None, None)),
    (K8S, pod(), "no-such-role", None,
     verdict("no-such-role", False, "role_not_permitted", "role 'no-such-role' does not exist",
             None, None)),
    (K8S, pod(namespace="billing", sa="worker"), "secret", None,
     verdict("secret", True, None, "rule 'billing-sa' allows role 'secret' (ttl capped at "
             "3600s)", "billing-sa", 600)),
    # A Kubernetes workload is namespace/serviceaccount: a '/' no certificate name takes.
    (K8S, pod(), "cert-by-workload", None,
     verdict("cert-by-workload", False, "template_value_refused",
             "the identity's workload cannot be used in parameter 'common_name': it must be "
             "letters, digits, '-' or '_' (at most 63)", "payments-db", None)),
    # The pod's uid does not exist at admission: a template over it is not judged...
    (K8S, pod(), "cert-by-instance", None,
     verdict("cert-by-instance", True, None, "rule 'payments-db' allows role "
             "'cert-by-instance' (ttl capped at 600s)", "payments-db", 600)),
    # ...but where the claims carry the instance id, it is.
    (K8S, pod(pod={"name": "api-1", "uid": "6a1c-0b2d"}), "cert-by-instance", None,
     verdict("cert-by-instance", True, None, "rule 'payments-db' allows role "
             "'cert-by-instance' (ttl capped at 600s)", "payments-db", 600)),
    (GENERIC, {"run": "run:7", "repo": "org-a"}, "cert-by-instance", None,
     verdict("cert-by-instance", False, "template_value_refused",
             "the identity's instance_id cannot be used in parameter 'common_name': it must "
             "be letters, digits, '-' or '_' (at most 63)", "ci-certs", None)),
    (GENERIC, {"repo": "org-a"}, "cert-by-issuer", None,
     verdict("cert-by-issuer", True, None, "rule 'ci-certs' allows role 'cert-by-issuer' "
             "(ttl capped at 3600s)", "ci-certs", 600)),
    # Rules are scoped to their issuer: the same claims under another issuer get nothing.
    (GENERIC, {"repo": "payments", "kubernetes.io": {"namespace": "payments"}}, "db", None,
     verdict("db", False, "role_not_permitted", NO_RULE, None, None)),
    (GENERIC, {"repo": "org-A"}, "cert-by-issuer", None,
     verdict("cert-by-issuer", False, "role_not_permitted", NO_RULE, None, None)),
]


@pytest.mark.parametrize(("issuer", "claims", "role_name", "ttl", "expected"), CASES, ids=[
    "granted-default-ttl", "granted-ttl-capped-by-rule", "granted-ttl-asked",
    "no-rule-applies", "rules-apply-none-allows", "unknown-role", "glob-on-workload",
    "template-refuses-workload", "instance-template-unknown-at-admission",
    "instance-template-with-uid", "instance-template-refused", "issuer-template",
    "rule-of-another-issuer", "regex-is-case-sensitive"])
def test_each_role_gets_its_verdict(issuer, claims, role_name, ttl, expected):
    answer = run(issuer, claims, [role_name], ttl)
    assert answer["roles"] == [expected]


def test_the_answer_names_the_issuer_and_the_mapped_identity():
    answer = run(K8S, pod(), ["db"])
    assert set(answer) == {"issuer", "identity", "roles"}
    assert answer["issuer"] == "k8s-prod"
    assert answer["identity"] == {"subject": "system:serviceaccount:payments:api",
                                  "workload": "payments/api", "instance_id": ""}
    with_uid = run(K8S, pod(pod={"name": "api-1", "uid": "6a1c"}), ["db"])
    assert with_uid["identity"]["instance_id"] == "6a1c"


def test_roles_are_answered_in_order_and_a_repeat_again():
    """Two credentials of one pod may ask for the same role."""
    answer = run(K8S, pod(), ["secret", "db", "db", "no-such-role"])
    assert [(r["role"], r["granted"]) for r in answer["roles"]] == [
        ("secret", False), ("db", True), ("db", True), ("no-such-role", False)]


@pytest.mark.parametrize(("issuer", "claims", "named"), [
    (K8S, {"sub": "x"}, "kubernetes.io.namespace"),
    (K8S, {"kubernetes.io": {"namespace": "payments", "serviceaccount": {"name": "a b"}}},
     "kubernetes.io.serviceaccount.name"),
    (GENERIC, {"repo": "org-a", "run": "a/../b"}, "instance id"),
    (GENERIC, {"repo": ["org-a"]}, "repo"),
], ids=["no-namespace", "bad-serviceaccount", "dot-segment-instance", "list-workload"])
def test_claims_the_mapping_refuses_are_a_bad_request_saying_why(issuer, claims, named):
    with pytest.raises(BadRequest) as refused:
        run(issuer, claims, ["db"])
    assert refused.value.code == "invalid_claims"
    assert refused.value.message.startswith(
        f"the claims do not map to an identity of issuer {issuer.name}: ")
    assert named in refused.value.message


def test_the_preview_leaves_the_claims_as_they_were():
    claims = pod(pod={"name": "api-1"})
    before = copy.deepcopy(claims)
    identity = preview_identity(K8S, claims)
    run(K8S, claims, ["db", "cert-by-instance"])
    assert claims == before
    with pytest.raises(TypeError):
        identity.claims["sub"] = "someone else"  # type: ignore[index]
    assert claims == before


def test_a_rule_on_a_claim_sees_the_supplied_claims():
    """Conditions on claims beyond the mapping (here the namespace) read the claims as given."""
    assert run(K8S, pod(namespace="payments", sa="other"), ["db"])["roles"][0]["granted"]
    assert not run(K8S, pod(namespace="payment", sa="api"), ["db"])["roles"][0]["granted"]


ON_ISS_AND_AUD = (
    rule("ci-by-iss", ["db"], issuer="ci",
         match=[{"claim": ["iss"], "exact": "https://ci.example"}]),
    rule("ci-by-aud", ["secret"], issuer="ci", match=[{"claim": ["aud"], "exact": AUDIENCE}]),
    rule("k8s-by-iss", ["db"], issuer="k8s-prod",
         match=[{"claim": ["iss"], "exact": "https://k8s.example"}]),
    rule("k8s-by-aud", ["secret"], issuer="k8s-prod",
         match=[{"claim": ["aud"], "exact": AUDIENCE}]),
)


def granted(issuer: IssuerSettings, claims: dict[str, Any]) -> dict[str, bool]:
    answer = preview(issuer, claims, ["db", "secret"], None, roles=ROLES, rules=ON_ISS_AND_AUD,
                     audience=AUDIENCE)
    return {r["role"]: r["granted"] for r in answer["roles"]}


def test_iss_and_aud_are_the_issuers_own_when_the_caller_leaves_them_out():
    """Every real token carries both (verification requires them), so a rule on them must be
    previewed as the exchange will decide it; the injector sends neither."""
    assert granted(GENERIC, {"repo": "org-a"}) == {"db": True, "secret": True}
    # A Kubernetes projected token's aud is a list, which no string condition matches:
    # the preview says so, as the exchange would.
    assert granted(K8S, pod()) == {"db": True, "secret": False}


def test_iss_and_aud_the_caller_gives_are_taken_as_given():
    claims = {"repo": "org-a", "iss": "https://elsewhere.example", "aud": "someone-else"}
    before = copy.deepcopy(claims)
    assert granted(GENERIC, claims) == {"db": False, "secret": False}
    assert claims == before
    assert granted(K8S, {**pod(), "aud": AUDIENCE}) == {"db": True, "secret": True}
