"""Property tests: no tampering with a valid ES256 token is ever accepted, and tampering
never makes verification raise anything but ``TokenInvalid``.

The Hypothesis example database is off (``database=None``): failures are reproduced from
the printed falsifying example, not from state kept on disk.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from broker.errors import TokenInvalid
from tests.unit.identity.tokenkit import (
    AUDIENCE,
    ISSUER,
    NOW,
    NOW_TS,
    b64,
    claims,
    issuer,
    token,
    unb64,
    verify,
)

ISS = issuer(instance_claim=("inst",), workload_claim=("wl",))
CLAIMS = claims(sub="system:serviceaccount:prod:api", inst="pod-5d2c", wl="prod/api",
                nbf=NOW_TS - 60)
VALID = token(CLAIMS)
HEADER_SEG, PAYLOAD_SEG, SIG_SEG = VALID.split(".")
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

# Every code verification may legitimately refuse a tampered token with.
KNOWN_CODES = {
    "token_too_large", "token_malformed", "token_encrypted", "token_header_refused",
    "token_algorithm_refused", "token_missing_claim", "token_key_mismatch",
    "token_bad_signature", "token_expired", "token_not_yet_valid", "token_wrong_audience",
    "token_wrong_issuer", "token_lifetime_too_long", "token_claim_invalid", "token_invalid",
}

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def assert_refused(raw: str) -> str:
    """Refused with TokenInvalid and a known code; anything else (acceptance or another
    exception type) fails the property."""
    with pytest.raises(TokenInvalid) as caught:
        identity = verify(raw, iss=ISS)
        pytest.fail(f"tampered token accepted: {raw!r} -> {identity!r}")
    assert caught.value.code in KNOWN_CODES
    return caught.value.code


def test_the_token_under_attack_is_valid() -> None:
    identity = verify(VALID, iss=ISS)
    assert (identity.instance_id, identity.workload, identity.jti) == (
        "pod-5d2c", "prod/api", "jti-0001")
    assert identity.subject == "system:serviceaccount:prod:api"


# --------------------------------------------------------------- byte-level mutation

_chars = st.one_of(
    st.sampled_from(B64URL + ".=+/ \n\t\x00"),
    st.characters(),  # anything, including non-ASCII and surrogates
)


@st.composite
def byte_mutations(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["flip", "replace", "insert", "delete"]))
    if kind == "insert":
        pos = draw(st.integers(0, len(VALID)))
        return VALID[:pos] + draw(_chars) + VALID[pos:]
    pos = draw(st.integers(0, len(VALID) - 1))
    if kind == "delete":
        return VALID[:pos] + VALID[pos + 1:]
    if kind == "flip":
        bit = draw(st.integers(0, 7))
        return VALID[:pos] + chr(ord(VALID[pos]) ^ (1 << bit)) + VALID[pos + 1:]
    return VALID[:pos] + draw(_chars) + VALID[pos + 1:]


@FUZZ
@given(mutated=byte_mutations())
# Deterministic corners: last signature char (unused low bits of base64), the dots,
# padding on the signature, a standard-alphabet char in each segment.
@example(mutated=VALID[:-1] + ("A" if VALID[-1] != "A" else "B"))
@example(mutated=VALID[:-1])
@example(mutated=VALID + "=")
@example(mutated=VALID.replace(".", "", 1))
@example(mutated=VALID.replace(".", "..", 1))
@example(mutated=HEADER_SEG + "." + PAYLOAD_SEG[:-1] + "+" + "." + SIG_SEG)
@example(mutated=HEADER_SEG + "." + PAYLOAD_SEG + "." + "/" + SIG_SEG[1:])
@example(mutated=" " + VALID)
def test_byte_mutation_is_never_accepted(mutated: str) -> None:
    assume(mutated != VALID)
    assert_refused(mutated)


# --------------------------------------------------------------- claim-level mutation

_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=40),
    st.floats(allow_nan=True, allow_infinity=True),
    # Values close to the real ones are the interesting ones: a nudged exp, a near-miss iss.
    st.integers(NOW_TS - 4000, NOW_TS + 4000),
    st.sampled_from([ISSUER, ISSUER + "/", AUDIENCE, [AUDIENCE], "pod-5d2c", "pod-evil",
                     "prod/admin", 0, -1, 2**63, 10**20]),
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10,
)
_claim_names = st.one_of(st.sampled_from(sorted(CLAIMS)),
                         st.sampled_from(["nbf", "admin", "roles", "kid", "alg"]),
                         st.text(min_size=1, max_size=12))


def _encode(obj: dict[str, Any], style: int) -> bytes:
    if style == 0:
        return json.dumps(obj, separators=(",", ":")).encode()
    if style == 1:
        return json.dumps(obj).encode()
    return json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8")


@st.composite
def payload_mutations(draw: st.DrawFn) -> str:
    payload = dict(CLAIMS)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(_claim_names)
        if name in payload and draw(st.booleans()):
            del payload[name]
        else:
            payload[name] = draw(_json_values)
    style = draw(st.integers(0, 2))
    return f"{HEADER_SEG}.{b64(_encode(payload, style))}.{SIG_SEG}"


@FUZZ
@given(mutated=payload_mutations())
@example(mutated=f"{HEADER_SEG}.{b64(_encode({**CLAIMS, 'inst': 'pod-evil'}, 0))}.{SIG_SEG}")
@example(mutated=f"{HEADER_SEG}.{b64(_encode({**CLAIMS, 'exp': NOW_TS + 601}, 0))}.{SIG_SEG}")
@example(mutated=f"{HEADER_SEG}.{b64(_encode(CLAIMS, 1))}.{SIG_SEG}")  # same claims, spaced
def test_payload_mutation_without_resigning_is_never_accepted(mutated: str) -> None:
    assume(mutated != VALID)
    assert_refused(mutated)


_header_values = st.one_of(_json_scalars,
                           st.sampled_from(["none", "HS256", "RS256", "ES384", "EdDSA",
                                            "k2", "", "JWT", {"kty": "EC"}]))


@st.composite
def header_mutations(draw: st.DrawFn) -> str:
    header = json.loads(unb64(HEADER_SEG))
    name = draw(st.one_of(st.sampled_from(["alg", "kid", "typ", "jku", "jwk", "crit",
                                           "x5t", "b64"]),
                          st.text(min_size=1, max_size=8)))
    if name in header and draw(st.booleans()):
        del header[name]
    else:
        header[name] = draw(_header_values)
    return f"{b64(_encode(header, draw(st.integers(0, 2))))}.{PAYLOAD_SEG}.{SIG_SEG}"


@FUZZ
@given(mutated=header_mutations())
@example(mutated=f"{b64(_encode({'alg': 'ES256', 'typ': 'JWT', 'kid': 'k2'}, 0))}"
                 f".{PAYLOAD_SEG}.{SIG_SEG}")
def test_header_mutation_without_resigning_is_never_accepted(mutated: str) -> None:
    assume(mutated != VALID)
    assert_refused(mutated)


# --------------------------------------------------------------- re-signed time claims
# Not tampering but a careless (or hostile) issuer: the *signed* time claims take any
# numeric value. Whatever is accepted must satisfy every time rule; nothing but
# TokenInvalid may escape. NaN and the infinities are included: they must be refused as
# token_malformed (see also test_exp_nan_/test_iat_nan_/test_nbf_nan_ in test_verify.py).

_times = st.one_of(
    st.integers(NOW_TS - 8000, NOW_TS + 8000),
    st.floats(NOW_TS - 8000, NOW_TS + 8000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
    st.sampled_from([True, False, None, "1", [NOW_TS]]),
)


@FUZZ
@given(iat=_times, exp=_times, nbf=st.one_of(st.just(None), _times))
def test_signed_time_claims_accepted_only_within_the_rules(iat: Any, exp: Any,
                                                           nbf: Any) -> None:
    overrides: dict[str, Any] = {"iat": iat, "exp": exp}
    if nbf is not None:
        overrides["nbf"] = nbf
    raw = token(claims(inst="pod-5d2c", wl="prod/api", **overrides))
    now = NOW.timestamp()
    try:
        identity = verify(raw, iss=ISS)
    except TokenInvalid as exc:
        assert exc.code in KNOWN_CODES
        return
    numbers = (iat, exp) + (() if nbf is None else (nbf,))
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers)
    assert all(math.isfinite(v) and abs(v) < 1e11 for v in numbers)
    assert exp + ISS.leeway_s >= now
    assert iat - ISS.leeway_s <= now
    assert exp - iat <= ISS.max_token_lifetime
    if nbf is not None:
        assert nbf - ISS.leeway_s <= now
    assert identity.expires_at.timestamp() == pytest.approx(exp)
    assert identity.issued_at.timestamp() == pytest.approx(iat)
