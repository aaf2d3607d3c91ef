"""map_claims: the issuer's claim mapping on its own (what a policy preview uses), and
proof that verify_signed maps a signed token's claims exactly as it does."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import TokenInvalid
from broker.identity.settings import IssuerSettings
from broker.identity.verify import MappedClaims, map_claims
from tests.unit.identity.tokenkit import ISSUER, claims, issuer, token, verify


def of_kind(kind: str) -> IssuerSettings:
    """An issuer with its kind's own claim mapping (no instance or workload claim set)."""
    return IssuerSettings(name=kind.replace("_", "-"), issuer=ISSUER, kind=kind,
                          jwks_uri="https://issuer.example/jwks", algorithms=("ES256",))


K8S, GITHUB, GCP = of_kind("kubernetes"), of_kind("github_actions"), of_kind("gcp")
GENERIC = issuer(instance_claim=("inst",), workload_claim=("wl",))
POD = {"kubernetes.io": {"namespace": "payments", "serviceaccount": {"name": "api"},
                         "pod": {"name": "api-7f9c", "uid": "6a1c-uid"}}}


def mapped(claim_set: dict[str, Any], iss: IssuerSettings, **kw: Any) -> MappedClaims | str:
    """The mapping, or 'refused:<code>'."""
    try:
        return map_claims(claim_set, iss, **kw)
    except TokenInvalid as exc:
        return f"refused:{exc.code}"


def verified(claim_set: dict[str, Any], iss: IssuerSettings) -> MappedClaims | str:
    """What verify_signed makes of a signed token carrying ``claim_set``."""
    try:
        identity = verify(token(claims(**claim_set)), iss=iss)
    except TokenInvalid as exc:
        return f"refused:{exc.code}"
    return MappedClaims(identity.subject, identity.instance_id, identity.workload)


KINDS = [
    (K8S, {"sub": "system:serviceaccount:payments:api", **POD},
     MappedClaims("system:serviceaccount:payments:api", "6a1c-uid", "payments/api")),
    (GITHUB, {"sub": "repo:o/r:ref:refs/heads/main", "run_id": "81", "run_attempt": 2,
              "repository_owner_id": "7", "repository_id": "99"},
     MappedClaims("repo:o/r:ref:refs/heads/main", "81-2", "7:99")),
    (GCP, {"sub": "1234", "email": "vm@p.iam.gserviceaccount.com",
           "google": {"compute_engine": {"project_id": "p", "instance_id": "555"}}},
     MappedClaims("1234", "p:555", "vm@p.iam.gserviceaccount.com")),
    (GENERIC, {"inst": "i-1", "wl": "payments"}, MappedClaims("pod-7f3a", "i-1", "payments")),
]


@pytest.mark.parametrize(("iss", "claim_set", "expected"), KINDS,
                         ids=["kubernetes", "github_actions", "gcp", "generic"])
def test_each_kind_maps_its_claims_as_the_verifier_does(iss, claim_set, expected):
    assert mapped({**claims(), **claim_set}, iss) == expected
    assert verified(claim_set, iss) == expected


def test_a_subject_that_is_not_a_string_maps_to_empty():
    assert mapped({"sub": 5, "inst": "i-1", "wl": "w"}, GENERIC) == MappedClaims("", "i-1", "w")


# -------------------------------------------------------------------- instance optional

PREVIEW_CASES = [
    # (claims, issuer, mapping with the instance optional)
    ({"sub": "system:serviceaccount:payments:api",
      "kubernetes.io": {"namespace": "payments", "serviceaccount": {"name": "api"}}}, K8S,
     MappedClaims("system:serviceaccount:payments:api", "", "payments/api")),
    ({"kubernetes.io": {"namespace": "payments", "serviceaccount": {"name": "api"},
                        "pod": {"name": "api-1"}}}, K8S, MappedClaims("", "", "payments/api")),
    ({"wl": "payments"}, GENERIC, MappedClaims("", "", "payments")),
    ({"wl": "payments", "inst": None}, GENERIC, MappedClaims("", "", "payments")),
    ({"run_id": "81", "repository_owner_id": "7", "repository_id": "99"}, GITHUB,
     MappedClaims("", "", "7:99")),
    # Present but not an instance id: refused even in a preview.
    ({"wl": "payments", "inst": "a/../b"}, GENERIC, "refused:token_claim_invalid"),
    ({"wl": "payments", "inst": "-x"}, GENERIC, "refused:token_claim_invalid"),
    ({"wl": "payments", "inst": ["i-1"]}, GENERIC, "refused:token_claim_invalid"),
    ({"wl": "payments", "inst": {"id": "i-1"}}, GENERIC, "refused:token_claim_invalid"),
    ({"run_id": "8-1", "run_attempt": "2", "repository_owner_id": "7",
      "repository_id": "99"}, GITHUB, "refused:token_claim_invalid"),
    # The workload is never optional.
    ({"inst": "i-1"}, GENERIC, "refused:token_missing_claim"),
    ({}, GENERIC, "refused:token_missing_claim"),
    ({"wl": "pay ments"}, GENERIC, "refused:token_claim_invalid"),
    ({"kubernetes.io": {"namespace": "payments"}}, K8S, "refused:token_missing_claim"),
]


@pytest.mark.parametrize(("claim_set", "iss", "expected"), PREVIEW_CASES, ids=[
    "k8s-no-pod", "k8s-pod-without-uid", "generic-no-instance", "generic-null-instance",
    "github-no-attempt", "dot-segment", "leading-dash", "list", "object",
    "join-part-holding-separator", "no-workload", "nothing", "workload-with-space",
    "k8s-no-serviceaccount"])
def test_with_the_instance_optional_only_a_missing_instance_maps_to_empty(
        claim_set, iss, expected):
    assert mapped(claim_set, iss, instance_optional=True) == expected


def test_without_the_instance_optional_a_missing_instance_is_refused():
    assert mapped({"wl": "payments"}, GENERIC) == "refused:token_missing_claim"
    assert verified({"wl": "payments"}, GENERIC) == "refused:token_missing_claim"


# ---------------------------------------------------------------- the same as verifying

_TEXT = st.sampled_from(["i-1", "payments", "a/b", "a/../b", "-x", "", "x" * 300, "ok\n",
                         "spiffe://td/x", "a b", "é"])
_VALUE = st.one_of(_TEXT, st.integers(-5, 10**12), st.booleans(), st.none(),
                   st.lists(_TEXT, max_size=2), st.just({"k": "v"}))
_CLAIMS = st.fixed_dictionaries({}, optional={"inst": _VALUE, "wl": _VALUE, "sub": _TEXT,
                                              "run_id": _VALUE, "run_attempt": _VALUE,
                                              "repository_owner_id": _VALUE,
                                              "repository_id": _VALUE})


@settings(max_examples=300, deadline=None)
@given(claim_set=_CLAIMS, which=st.sampled_from([GENERIC, GITHUB]))
def test_verify_signed_maps_any_claims_exactly_as_map_claims(claim_set, which):
    """Mapping the claims alone and verifying a signed token that carries them agree on
    every outcome: the same identity or the same refusal."""
    assert verified(claim_set, which) == mapped({**claims(), **claim_set}, which)


def test_the_mapping_reads_no_registered_claim():
    """No iss, aud, exp or iat needed: a preview's claims need not be a token's."""
    assert mapped({"inst": "i-1", "wl": "w"}, GENERIC) == MappedClaims("", "i-1", "w")
