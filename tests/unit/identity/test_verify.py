"""inspect_token + verify_signed against forged, tampered and borderline tokens.

One parametrized case per attack, each pinned to the exact ``TokenInvalid.code``. Time is
fixed (``NOW``) and every token is built relative to it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from broker.errors import TokenInvalid
from broker.identity.verify import inspect_token
from tests.unit.identity.tokenkit import (
    ALL_ALGS_ISSUER,
    AUDIENCE,
    DEFAULT_ISSUER,
    DROP,
    EC256,
    EC384,
    ED25519,
    ISSUER,
    MAX_BYTES,
    NOW,
    NOW_TS,
    RSA1024,
    RSA2048,
    b64,
    claims,
    hs256_token,
    issuer,
    public_pem,
    pyjwt_token,
    seg,
    sign_input,
    token,
    unb64,
    verify,
)

# An issuer that maps the instance and workload from their own claims (not 'sub', which
# PyJWT itself insists is a string).
INST_WL = issuer(instance_claim=("inst",), workload_claim=("wl",))

# --------------------------------------------------------------------------- accepted


def test_valid_es256_token_yields_every_identity_field() -> None:
    payload = claims(sub="system:serviceaccount:ns:api", pod_uid="pod-1234",
                     workload="ns/api", iat=NOW_TS - 60, exp=NOW_TS + 600, jti="jti-abc")
    iss = issuer(instance_claim=("pod_uid",), workload_claim=("workload",))
    identity = verify(token(payload), iss=iss)

    assert identity.issuer_name == "k8s"
    assert identity.issuer == ISSUER
    assert identity.instance_id == "pod-1234"
    assert identity.workload == "ns/api"
    assert identity.subject == "system:serviceaccount:ns:api"
    assert identity.issued_at == datetime.fromtimestamp(NOW_TS - 60, UTC)
    assert identity.expires_at == datetime.fromtimestamp(NOW_TS + 600, UTC)
    assert identity.expires_at == datetime(2030, 6, 1, 12, 10, 0, tzinfo=UTC)
    assert identity.jti == "jti-abc"
    assert dict(identity.claims) == payload
    assert identity.public() == {
        "issuer_name": "k8s",
        "issuer": ISSUER,
        "subject": "system:serviceaccount:ns:api",
        "instance_id": "pod-1234",
        "workload": "ns/api",
        "expires_at": "2030-06-01T12:10:00+00:00",
    }


def test_token_built_by_pyjwt_is_accepted() -> None:
    identity = verify(pyjwt_token(claims(), EC256, "ES256"))
    assert (identity.instance_id, identity.workload, identity.jti) == (
        "pod-7f3a", "pod-7f3a", "jti-0001")


@pytest.mark.parametrize(
    ("alg", "key"),
    [("RS256", RSA2048), ("PS256", RSA2048), ("EdDSA", ED25519), ("ES384", EC384),
     ("ES256", EC256)],
    ids=["RS256", "PS256", "EdDSA-Ed25519", "ES384-P384", "ES256-P256"],
)
def test_each_allowed_algorithm_is_accepted_when_the_issuer_allows_it(alg: str,
                                                                      key: Any) -> None:
    for raw in (token(claims(sub=f"pod-{alg.lower()}"), key=key, alg=alg),
                pyjwt_token(claims(sub=f"pod-{alg.lower()}"), key, alg)):
        identity = verify(raw, key=key, iss=ALL_ALGS_ISSUER)
        assert identity.instance_id == f"pod-{alg.lower()}"
        assert identity.expires_at == datetime.fromtimestamp(NOW_TS + 600, UTC)


def _accepted_cases() -> list[Any]:
    nested = issuer(instance_claim=("kubernetes.io", "pod", "uid"),
                    workload_claim=("kubernetes.io", "serviceaccount", "name"))
    k8s = {"kubernetes.io": {"namespace": "prod",
                             "pod": {"name": "api-0", "uid": "0c8f6c1e-1b2a-4c1d-9e7f-aa"},
                             "serviceaccount": {"name": "api", "uid": "x"}}}
    return [
        pytest.param(lambda: token(claims(exp=NOW_TS - 29)), DEFAULT_ISSUER,
                     ("pod-7f3a", "pod-7f3a"), id="expired-within-leeway"),
        pytest.param(lambda: token(claims(exp=NOW_TS - 30)), DEFAULT_ISSUER,
                     ("pod-7f3a", "pod-7f3a"), id="expired-exactly-at-leeway-edge"),
        pytest.param(lambda: token(claims(nbf=NOW_TS + 29)), DEFAULT_ISSUER,
                     ("pod-7f3a", "pod-7f3a"), id="nbf-in-future-within-leeway"),
        pytest.param(lambda: token(claims(iat=NOW_TS + 29, exp=NOW_TS + 600)), DEFAULT_ISSUER,
                     ("pod-7f3a", "pod-7f3a"), id="iat-in-future-within-leeway"),
        pytest.param(lambda: token(claims(iat=NOW_TS - 100, exp=NOW_TS - 100 + 3600)),
                     DEFAULT_ISSUER, ("pod-7f3a", "pod-7f3a"),
                     id="lifetime-exactly-max"),
        pytest.param(lambda: token(claims(aud=["other", AUDIENCE, "third"])), DEFAULT_ISSUER,
                     ("pod-7f3a", "pod-7f3a"), id="aud-array-containing-broker"),
        pytest.param(lambda: token(claims(sub="pod-1", **k8s)), nested,
                     ("0c8f6c1e-1b2a-4c1d-9e7f-aa", "api"), id="nested-claim-paths"),
        pytest.param(lambda: token(claims(inst=123456, wl="api")), INST_WL,
                     ("123456", "api"), id="integer-instance-claim-stringified"),
        pytest.param(lambda: token(claims(sub="a" * 254)), DEFAULT_ISSUER,
                     ("a" * 254, "a" * 254), id="instance-254-chars-max"),
        pytest.param(lambda: token(claims(), kid=None), DEFAULT_ISSUER,
                     ("pod-7f3a", "pod-7f3a"), id="no-kid"),
        pytest.param(lambda: token(claims(), header={"alg": "ES256", "typ": "at+jwt"}),
                     DEFAULT_ISSUER, ("pod-7f3a", "pod-7f3a"), id="typ-at+jwt"),
        pytest.param(lambda: token(claims(), header={"alg": "ES256", "x5t": "abc"}),
                     DEFAULT_ISSUER, ("pod-7f3a", "pod-7f3a"), id="x5t-thumbprint-allowed"),
    ]


@pytest.mark.parametrize(("build", "iss", "expected"), _accepted_cases())
def test_borderline_token_is_accepted(build: Callable[[], str], iss: Any,
                                      expected: tuple[str, str]) -> None:
    identity = verify(build(), iss=iss)
    assert (identity.instance_id, identity.workload) == expected
    assert identity.issuer_name == "k8s"


# --------------------------------------------------------------------------- refused


def _alg_none(with_signature: bool) -> str:
    head = f"{seg({'alg': 'none', 'typ': 'JWT'})}.{seg(claims())}"
    return f"{head}.{b64(b'anything')}" if with_signature else f"{head}."


def _zero_signature() -> str:
    raw = token()
    head, _, _ = raw.rpartition(".")
    return f"{head}.{b64(bytes(64))}"


def _flipped_signature() -> str:
    raw = token()
    head, _, sig = raw.rpartition(".")
    data = bytearray(unb64(sig))
    data[10] ^= 0x01
    return f"{head}.{b64(bytes(data))}"


def _duplicate_payload_member() -> str:
    # The first "iss" is what a lax parser keeps, the last is what json.loads keeps.
    body = (f'{{"iss":"https://evil.example","aud":"{AUDIENCE}","sub":"pod-1",'
            f'"iat":{NOW_TS - 60},"exp":{NOW_TS + 600},"iss":"{ISSUER}"}}').encode()
    return token(body)


def _duplicate_header_member() -> str:
    return token(claims(), header=b'{"alg":"HS256","kid":"k1","alg":"ES256"}')


def _with_char(raw: str, segment: int, index: int, char: str) -> str:
    parts = raw.split(".")
    parts[segment] = parts[segment][:index] + char + parts[segment][index + 1:]
    return ".".join(parts)


def _iss(value: str) -> Callable[[], str]:
    return lambda: token(claims(iss=value))


ISS_WITH_SLASH = ISSUER + "/"
ISS_CYRILLIC = "https://issuer.ex\u0430mple"  # U+0430 CYRILLIC SMALL LETTER A
ISS_SUPERSTRING = ISSUER + ".evil.example"
ISS_SUBSTRING = "https://issuer"

REFUSED: list[Any] = [
    # --- algorithm and key confusion -------------------------------------------------
    # alg:none with a signature segment gets as far as the algorithm allow-list.
    pytest.param(lambda: _alg_none(True), {}, "token_algorithm_refused",
                 id="alg-none-with-signature"),
    # alg:none with an empty third segment: inspect_token lets an empty signature segment
    # through the segment check and refuses the algorithm first (observed and sensible:
    # the algorithm allow-list is the stronger statement). An allowed alg with an empty
    # signature segment is refused as malformed ("not signed"), see below.
    pytest.param(lambda: _alg_none(False), {}, "token_algorithm_refused",
                 id="alg-none-without-signature"),
    pytest.param(lambda: token(claims()).rpartition(".")[0] + ".", {}, "token_malformed",
                 id="es256-empty-signature"),
    pytest.param(lambda: token(claims(), header={"alg": "None"}, alg="ES256"), {},
                 "token_algorithm_refused", id="alg-None-capitalised"),
    pytest.param(lambda: token(claims(), header={"typ": "JWT"}), {},
                 "token_algorithm_refused", id="alg-missing"),
    pytest.param(lambda: token(claims(), header={"alg": ["ES256"]}), {},
                 "token_algorithm_refused", id="alg-not-a-string"),
    pytest.param(lambda: hs256_token(claims(), public_pem(EC256)), {},
                 "token_algorithm_refused", id="hs256-with-issuer-public-pem"),
    pytest.param(lambda: hs256_token(claims(), public_pem(RSA2048)),
                 {"key": RSA2048, "iss": ALL_ALGS_ISSUER},
                 "token_algorithm_refused", id="hs256-with-rsa-public-pem"),
    pytest.param(lambda: token(claims(), key=RSA2048, alg="PS256"), {},
                 "token_algorithm_refused", id="ps256-not-pinned-for-issuer"),
    pytest.param(lambda: token(claims(), key=RSA2048, alg="RS256"),
                 {"key": EC256, "iss": ALL_ALGS_ISSUER},
                 "token_key_mismatch", id="rs256-header-with-ec-key"),
    pytest.param(lambda: token(claims(), key=EC256, alg="ES256"),
                 {"key": RSA2048, "iss": ALL_ALGS_ISSUER},
                 "token_key_mismatch", id="es256-header-with-rsa-key"),
    pytest.param(lambda: token(claims(), key=EC384, alg="ES384", header={"alg": "ES256"}),
                 {"key": EC384, "iss": ALL_ALGS_ISSUER},
                 "token_key_mismatch", id="es256-header-with-p384-key"),
    pytest.param(lambda: token(claims(), key=EC256, alg="ES256", header={"alg": "ES384"}),
                 {"key": EC256, "iss": ALL_ALGS_ISSUER},
                 "token_key_mismatch", id="es384-header-with-p256-key"),
    pytest.param(lambda: token(claims(), key=RSA1024, alg="RS256"),
                 {"key": RSA1024, "iss": ALL_ALGS_ISSUER},
                 "token_key_mismatch", id="rsa-1024-bit-key"),
    pytest.param(lambda: token(claims(), key=ED25519, alg="EdDSA"),
                 {"key": EC256, "iss": ALL_ALGS_ISSUER},
                 "token_key_mismatch", id="eddsa-header-with-ec-key"),
    # --- header parameters that would let the token pick its own key ------------------
    *[pytest.param((lambda p=p, v=v: token(claims(), header={"alg": "ES256", p: v})), {},
                   "token_header_refused", id=f"header-{p}")
      for p, v in [("jwk", {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}),
                   ("jku", "https://evil.example/jwks"),
                   ("x5u", "https://evil.example/cert.pem"),
                   ("x5c", ["MIIBIjANBgkq"]),
                   ("crit", ["exp"]),
                   ("cty", "JWT"),
                   ("b64", False),
                   ("enc", "A256GCM"),
                   ("zip", "DEF"),
                   ("x-unknown", 1)]],
    pytest.param(lambda: token(claims(), header={"alg": "ES256", "typ": "JWE"}), {},
                 "token_header_refused", id="typ-not-jwt"),
    pytest.param(lambda: "a.b.c.d.e", {}, "token_encrypted", id="five-segment-jwe"),
    pytest.param(lambda: (f"{seg({'alg': 'RSA-OAEP', 'enc': 'A256GCM'})}.{b64(b'k' * 32)}."
                          f"{b64(b'iv')}.{b64(b'ciphertext')}.{b64(b'tag')}"), {},
                 "token_encrypted", id="five-segment-jwe-realistic"),
    # --- signatures ------------------------------------------------------------------
    pytest.param(_zero_signature, {}, "token_bad_signature", id="ecdsa-r0-s0"),
    pytest.param(_flipped_signature, {}, "token_bad_signature", id="signature-bit-flipped"),
    pytest.param(lambda: token(claims(), key=ec.generate_private_key(ec.SECP256R1())), {},
                 "token_bad_signature", id="signed-by-another-p256-key"),
    pytest.param(lambda: token(claims()).rpartition(".")[0] + "." + b64(bytes(63)), {},
                 "token_bad_signature", id="ecdsa-signature-wrong-length"),
    pytest.param(lambda: token(claims()) + "=", {}, "token_malformed",
                 id="signature-padded"),
    pytest.param(lambda: token(claims()).rpartition(".")[0] + ".!!!!", {}, "token_malformed",
                 id="signature-not-base64url"),
    # --- time ------------------------------------------------------------------------
    pytest.param(lambda: token(claims(exp=NOW_TS - 31)), {}, "token_expired",
                 id="expired-beyond-leeway"),
    pytest.param(lambda: token(claims(iat=NOW_TS - 7200, exp=NOW_TS - 3700)), {},
                 "token_expired", id="expired-long-ago"),
    pytest.param(lambda: token(claims(nbf=NOW_TS + 31)), {}, "token_not_yet_valid",
                 id="nbf-future-beyond-leeway"),
    pytest.param(lambda: token(claims(nbf="soon")), {}, "token_malformed",
                 id="nbf-not-a-number"),
    pytest.param(lambda: token(claims(iat=NOW_TS + 31, exp=NOW_TS + 600)), {},
                 "token_not_yet_valid", id="iat-future-beyond-leeway"),
    pytest.param(lambda: token(claims(iat=NOW_TS - 60, exp=NOW_TS - 60 + 3601)), {},
                 "token_lifetime_too_long", id="lifetime-one-second-too-long"),
    pytest.param(lambda: token(claims(iat=NOW_TS - 60, exp=NOW_TS + 86400 * 365)), {},
                 "token_lifetime_too_long", id="lifetime-one-year"),
    pytest.param(lambda: token(claims(exp="2030-06-01T13:00:00Z")), {}, "token_malformed",
                 id="exp-not-a-number"),
    pytest.param(lambda: token(claims(iat=True)), {}, "token_malformed",
                 id="iat-boolean"),
    # --- required claims ---------------------------------------------------------------
    pytest.param(lambda: token(claims(exp=DROP)), {}, "token_missing_claim", id="missing-exp"),
    pytest.param(lambda: token(claims(iat=DROP)), {}, "token_missing_claim", id="missing-iat"),
    pytest.param(lambda: token(claims(aud=DROP)), {}, "token_missing_claim", id="missing-aud"),
    pytest.param(lambda: token(claims(iss=DROP)), {}, "token_missing_claim", id="missing-iss"),
    pytest.param(lambda: token(claims(iss=7)), {}, "token_missing_claim", id="iss-not-string"),
    # --- audience ---------------------------------------------------------------------
    pytest.param(lambda: token(claims(aud="other-service")), {}, "token_wrong_audience",
                 id="wrong-aud"),
    pytest.param(lambda: token(claims(aud=["a", "b"])), {}, "token_wrong_audience",
                 id="aud-array-without-broker"),
    pytest.param(lambda: token(claims(aud=AUDIENCE + " ")), {}, "token_wrong_audience",
                 id="aud-with-trailing-space"),
    # PyJWT reports an empty aud array as a missing 'aud' claim.
    pytest.param(lambda: token(claims(aud=[])), {}, "token_missing_claim",
                 id="aud-empty-array"),
    pytest.param(lambda: token(claims(aud=7)), {}, "token_wrong_audience",
                 id="aud-not-a-string"),
    # --- issuer: inspect_token returns it unverified; verify_signed refuses it --------
    pytest.param(_iss(ISS_WITH_SLASH), {}, "token_wrong_issuer", id="iss-trailing-slash"),
    pytest.param(_iss(ISS_CYRILLIC), {}, "token_wrong_issuer", id="iss-cyrillic-a"),
    pytest.param(_iss(ISS_SUPERSTRING), {}, "token_wrong_issuer", id="iss-superstring"),
    pytest.param(_iss(ISS_SUBSTRING), {}, "token_wrong_issuer", id="iss-substring"),
    pytest.param(_iss(ISSUER.upper()), {}, "token_wrong_issuer", id="iss-upper-case"),
    # --- instance / workload mapping -----------------------------------------------------
    pytest.param(lambda: token(claims(sub="pod-1")),
                 {"iss": issuer(instance_claim=("pod_uid",))}, "token_missing_claim",
                 id="missing-instance-claim"),
    pytest.param(lambda: token(claims(inst=None, wl="api")), {"iss": INST_WL},
                 "token_missing_claim", id="instance-claim-null"),
    pytest.param(lambda: token(claims(inst=True, wl="api")), {"iss": INST_WL},
                 "token_missing_claim", id="instance-claim-boolean"),
    # A non-string 'sub'/'jti' never reaches the mapping: PyJWT refuses it itself
    # (InvalidSubjectError / InvalidJTIError), which verify_signed has no specific code for.
    pytest.param(lambda: token(claims(sub=123)), {}, "token_invalid",
                 id="sub-not-a-string"),
    pytest.param(lambda: token(claims(jti=123)), {}, "token_invalid",
                 id="jti-not-a-string"),
    pytest.param(lambda: token(claims(**{"kubernetes.io": {"pod": "flat"}})),
                 {"iss": issuer(instance_claim=("kubernetes.io", "pod", "uid"))},
                 "token_missing_claim", id="nested-path-through-non-object"),
    pytest.param(lambda: token(claims(**{"kubernetes.io.pod.uid": "pod-1"})),
                 {"iss": issuer(instance_claim=("kubernetes.io", "pod", "uid"))},
                 "token_missing_claim", id="nested-path-not-dotted-key"),
    # '/' is allowed (SPIFFE IDs); backslash, '?', '#' and '%' are not.
    pytest.param(lambda: token(claims(sub="ns\\pod-1")), {}, "token_claim_invalid",
                 id="instance-with-backslash"),
    pytest.param(lambda: token(claims(sub="pod?x=1")), {}, "token_claim_invalid",
                 id="instance-with-query"),
    pytest.param(lambda: token(claims(sub="pod%2f1")), {}, "token_claim_invalid",
                 id="instance-with-percent"),
    pytest.param(lambda: token(claims(sub="../../sys/leases")), {}, "token_claim_invalid",
                 id="instance-path-traversal"),
    pytest.param(lambda: token(claims(sub="pod 1")), {}, "token_claim_invalid",
                 id="instance-with-space"),
    pytest.param(lambda: token(claims(sub="pod\t1")), {}, "token_claim_invalid",
                 id="instance-with-tab"),
    pytest.param(lambda: token(claims(sub=" pod-1")), {}, "token_claim_invalid",
                 id="instance-leading-space"),
    pytest.param(lambda: token(claims(sub="pod-1 ")), {}, "token_claim_invalid",
                 id="instance-trailing-space"),
    pytest.param(lambda: token(claims(sub="pod-1\nx")), {}, "token_claim_invalid",
                 id="instance-embedded-newline"),
    pytest.param(lambda: token(claims(sub="a" * 255)), {}, "token_claim_invalid",
                 id="instance-255-chars"),
    pytest.param(lambda: token(claims(sub="a" * 300)), {}, "token_claim_invalid",
                 id="instance-300-chars"),
    pytest.param(lambda: token(claims(sub="")), {}, "token_claim_invalid",
                 id="instance-empty"),
    pytest.param(lambda: token(claims(inst={"uid": "x"}, wl="api")), {"iss": INST_WL},
                 "token_claim_invalid", id="instance-object"),
    pytest.param(lambda: token(claims(inst=["pod-1"], wl="api")), {"iss": INST_WL},
                 "token_claim_invalid", id="instance-array"),
    pytest.param(lambda: token(claims(inst=-5, wl="api")), {"iss": INST_WL},
                 "token_claim_invalid", id="instance-negative-int"),
    pytest.param(lambda: token(claims(inst=1.5, wl="api")), {"iss": INST_WL},
                 "token_claim_invalid", id="instance-float"),
    pytest.param(lambda: token(claims(sub="p\u043ed-1")), {}, "token_claim_invalid",
                 id="instance-non-ascii"),
    pytest.param(lambda: token(claims(sub="pod-1", wl="a b")),
                 {"iss": issuer(workload_claim=("wl",))}, "token_claim_invalid",
                 id="workload-with-space"),
    # --- size and structure -------------------------------------------------------------
    pytest.param(lambda: "\u00e9\x00garbage." * (100 * 1024 // 10), {}, "token_too_large",
                 id="100KB-garbage"),
    pytest.param(lambda: "A" * (MAX_BYTES + 1), {}, "token_too_large",
                 id="one-byte-over-max"),
    pytest.param(lambda: token(b"not json at all"), {}, "token_malformed",
                 id="payload-not-json"),
    pytest.param(lambda: token(b'["iss","aud"]'), {}, "token_malformed",
                 id="payload-json-array"),
    pytest.param(lambda: token(b'"a string"'), {}, "token_malformed",
                 id="payload-json-string"),
    pytest.param(lambda: token(b"\xff\xfe{}"), {}, "token_malformed",
                 id="payload-not-utf8"),
    pytest.param(lambda: token(b"[" * 5000 + b"]" * 5000), {}, "token_malformed",
                 id="payload-deeply-nested"),
    pytest.param(lambda: token(claims(), header=b"[]"), {}, "token_malformed",
                 id="header-json-array"),
    pytest.param(lambda: token(claims(), header=b"{"), {}, "token_malformed",
                 id="header-not-json"),
    pytest.param(lambda: token(claims()).replace(".", ".\u00e9", 1), {}, "token_malformed",
                 id="non-ascii-token"),
    pytest.param(lambda: token(claims()).rpartition(".")[0], {}, "token_malformed",
                 id="two-segments"),
    pytest.param(lambda: token(claims()) + ".extra", {}, "token_malformed",
                 id="four-segments"),
    pytest.param(lambda: "", {}, "token_malformed", id="empty-string"),
    pytest.param(lambda: "..", {}, "token_malformed", id="empty-segments"),
    pytest.param(lambda: _with_char(token(claims()), 1, 0, "+"), {}, "token_malformed",
                 id="payload-standard-base64-plus"),
    pytest.param(lambda: _with_char(token(claims()), 0, 3, "/"), {}, "token_malformed",
                 id="header-standard-base64-slash"),
    pytest.param(lambda: seg({"alg": "ES256"}) + "=." + token().split(".", 1)[1], {},
                 "token_malformed", id="header-padded"),
    pytest.param(lambda: "A." + token().split(".", 1)[1], {},
                 "token_malformed", id="header-impossible-base64-length"),
    pytest.param(_duplicate_payload_member, {}, "token_malformed",
                 id="duplicate-payload-member"),
    pytest.param(_duplicate_header_member, {}, "token_malformed",
                 id="duplicate-header-member"),
    pytest.param(lambda: token(claims(), header={"alg": "ES256", "kid": 1}), {},
                 "token_malformed", id="kid-integer"),
    pytest.param(lambda: token(claims(), header={"alg": "ES256", "kid": ["k1"]}), {},
                 "token_malformed", id="kid-array"),
    pytest.param(lambda: token(claims(), header={"alg": "ES256", "kid": ""}), {},
                 "token_malformed", id="kid-empty"),
    pytest.param(lambda: token(claims(), header={"alg": "ES256", "kid": "k" * 257}), {},
                 "token_malformed", id="kid-257-chars"),
]


@pytest.mark.parametrize(("build", "kwargs", "code"), REFUSED)
def test_attack_is_refused_with_exact_code(build: Callable[[], str], kwargs: dict[str, Any],
                                           code: str) -> None:
    raw = build()
    with pytest.raises(TokenInvalid) as caught:
        verify(raw, **kwargs)
    assert caught.value.code == code
    assert caught.value.status == 401
    # Messages never echo the token back.
    if len(raw) > 8:
        assert raw not in caught.value.message


@pytest.mark.parametrize("wrong", [ISS_WITH_SLASH, ISS_CYRILLIC, ISS_SUPERSTRING,
                                   ISS_SUBSTRING],
                         ids=["trailing-slash", "cyrillic-a", "superstring", "substring"])
def test_inspect_returns_the_unverified_issuer_verbatim(wrong: str) -> None:
    unverified = inspect_token(token(claims(iss=wrong)), max_bytes=MAX_BYTES)
    assert unverified.issuer == wrong
    assert unverified.issuer != ISSUER
    assert (unverified.alg, unverified.kid) == ("ES256", "k1")
    assert dict(unverified.header) == {"alg": "ES256", "typ": "JWT", "kid": "k1"}


def test_size_limit_is_checked_before_anything_is_parsed() -> None:
    # Non-ASCII, one segment, not base64: every later check would refuse it differently.
    garbage = "\u2603" * (100 * 1024)
    with pytest.raises(TokenInvalid) as caught:
        inspect_token(garbage, max_bytes=MAX_BYTES)
    assert caught.value.code == "token_too_large"


def test_issuer_size_limit_applies_in_verify_signed_too() -> None:
    # The async verifier inspects with the largest limit of all issuers; the chosen
    # issuer's own (smaller) limit must still apply.
    raw = token(claims(padding="x" * 20_000))
    assert len(raw) > DEFAULT_ISSUER.max_token_bytes
    with pytest.raises(TokenInvalid) as caught:
        verify(raw, max_bytes=64 * 1024)
    assert caught.value.code == "token_too_large"


def test_same_token_refused_once_the_clock_passes_expiry() -> None:
    raw = token(claims(iat=NOW_TS - 60, exp=NOW_TS + 600))
    assert verify(raw, now=NOW).instance_id == "pod-7f3a"
    later = datetime.fromtimestamp(NOW_TS + 631, UTC)
    with pytest.raises(TokenInvalid) as caught:
        verify(raw, now=later)
    assert caught.value.code == "token_expired"


def test_verification_does_not_depend_on_the_wall_clock() -> None:
    # Signed for 2030: the real clock (years earlier) would call it "issued in the future".
    raw = token(claims())
    assert datetime.now(UTC) < NOW
    assert verify(raw).expires_at == datetime(2030, 6, 1, 12, 10, tzinfo=UTC)


# ------------------------------------------------------------ fixed production bugs
# Each of these once documented a defect as a strict xfail; the defects are fixed and the
# tests now guard against their return.


def _signed_raw_payload(body: str) -> str:
    """Sign a payload written by hand: json.dumps refuses NaN, an issuer's encoder may not."""
    return token(body.encode("ascii"))


def test_exp_nan_is_refused_as_token_invalid() -> None:
    raw = _signed_raw_payload(f'{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"pod-1",'
                              f'"iat":{NOW_TS - 60},"exp":NaN}}')
    with pytest.raises(TokenInvalid) as caught:
        verify(raw)
    assert caught.value.code == "token_malformed"


def test_iat_nan_is_refused_as_token_invalid() -> None:
    raw = _signed_raw_payload(f'{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"pod-1",'
                              f'"iat":NaN,"exp":{NOW_TS + 600}}}')
    with pytest.raises(TokenInvalid) as caught:
        verify(raw)
    assert caught.value.code == "token_malformed"


def test_nbf_nan_is_refused() -> None:
    raw = _signed_raw_payload(f'{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"pod-1",'
                              f'"iat":{NOW_TS - 60},"exp":{NOW_TS + 600},"nbf":NaN}}')
    with pytest.raises(TokenInvalid) as caught:
        verify(raw)
    assert caught.value.code == "token_malformed"


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "1e11", "-1e11"],
                         ids=["inf", "minus-inf", "1e11", "minus-1e11"])
def test_non_finite_or_huge_time_claim_is_malformed(claim: str, value: str) -> None:
    times = {"iat": str(NOW_TS - 60), "exp": str(NOW_TS + 600), "nbf": str(NOW_TS - 60)}
    times[claim] = value
    raw = _signed_raw_payload(f'{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"pod-1",'
                              + ",".join(f'"{k}":{v}' for k, v in times.items()) + "}")
    with pytest.raises(TokenInvalid) as caught:
        verify(raw)
    assert caught.value.code == "token_malformed"
    assert caught.value.message == "the token's exp, iat and nbf must be finite numbers"


@pytest.mark.parametrize("field", ["instance", "workload"])
def test_trailing_newline_in_mapped_claim_is_refused(field: str) -> None:
    iss = issuer(instance_claim=("inst",), workload_claim=("wl",))
    values = {"inst": "pod-1", "wl": "api"}
    values["inst" if field == "instance" else "wl"] += "\n"
    with pytest.raises(TokenInvalid) as caught:
        verify(token(claims(**values)), iss=iss)
    assert caught.value.code == "token_claim_invalid"


@pytest.mark.parametrize(("alg", "key"), [("ES256", EC256), ("RS256", RSA2048)],
                         ids=["ES256", "RS256"])
def test_padded_signature_segment_is_refused(alg: str, key: Any) -> None:
    raw = token(claims(), key=key, alg=alg) + "=="
    with pytest.raises(TokenInvalid) as caught:
        verify(raw, key=key, iss=ALL_ALGS_ISSUER)
    assert caught.value.code == "token_malformed"


def test_header_json_roundtrip_matches_what_was_sent() -> None:
    # Guard for the helpers themselves: the header we assemble is the header inspected.
    raw = token(claims(), header={"alg": "ES256", "kid": "kid-\u00e9"})
    header = json.loads(unb64(raw.split(".")[0]))
    assert header == {"alg": "ES256", "kid": "kid-\u00e9"}
    assert dict(inspect_token(raw, max_bytes=MAX_BYTES).header) == header


def test_sign_input_helper_produces_raw_ecdsa_signatures() -> None:
    # 64 bytes r||s for P-256, as JWS requires (not DER): otherwise the zero-signature and
    # bit-flip cases would be testing the wrong thing.
    assert len(unb64(sign_input("a.b", EC256, "ES256"))) == 64
    assert len(unb64(sign_input("a.b", EC384, "ES384"))) == 96


@pytest.mark.parametrize("typ", [None, "JWT", "jwt", "JOSE", "at+jwt"],
                         ids=["absent", "JWT", "jwt-lower", "JOSE-jwt-svid", "at+jwt"])
def test_token_types_real_issuers_send_are_accepted(typ):
    import jwt

    headers = {"kid": "k", "typ": typ}  # typ None: PyJWT leaves the header out
    key = ec.generate_private_key(ec.SECP256R1())
    raw = jwt.encode({"iss": "https://i"}, key, algorithm="ES256", headers=headers)
    assert inspect_token(raw, max_bytes=16384).header.get("typ") == typ


@pytest.mark.parametrize("typ", ["JWE", "secevent+jwt", "application/jose+json"],
                         ids=["JWE", "security-event", "jose-json"])
def test_other_token_types_are_refused(typ):
    import jwt

    key = ec.generate_private_key(ec.SECP256R1())
    raw = jwt.encode({"iss": "https://i"}, key, algorithm="ES256", headers={"typ": typ})
    with pytest.raises(TokenInvalid) as err:
        inspect_token(raw, max_bytes=16384)
    assert err.value.code == "token_header_refused"


@pytest.mark.parametrize("run_id,attempt", [("1-2", "3"), ("1", "2-3")],
                         ids=["separator-in-first", "separator-in-second"])
def test_a_composite_part_holding_the_separator_is_refused(run_id, attempt):
    from broker.identity.settings import ClaimJoin
    from broker.identity.verify import INSTANCE_ID_PATTERN, _mapped

    spec = ClaimJoin(join=(("run_id",), ("run_attempt",)), separator="-")
    with pytest.raises(TokenInvalid) as err:
        _mapped({"run_id": run_id, "run_attempt": attempt}, spec, "instance id",
                INSTANCE_ID_PATTERN)
    assert err.value.code == "token_claim_invalid"
    ok = _mapped({"run_id": "12", "run_attempt": "3"}, spec, "instance id", INSTANCE_ID_PATTERN)
    assert ok == "12-3"


@pytest.mark.parametrize("value,ok", [
    ("spiffe://example.org/ns/a", True), ("a/b", True), ("a/./b", False), ("a/../b", False),
    ("..", False), ("a/..", False), ("a..b", True), ("a/b/.", False),
], ids=["spiffe-id", "slash", "dot-segment", "dotdot-segment", "only-dotdot",
        "trailing-dotdot", "dots-inside-a-segment", "trailing-dot"])
def test_instance_ids_may_hold_slashes_but_no_dot_segments(value, ok):
    from broker.identity.verify import valid_instance_id

    assert valid_instance_id(value) is ok
