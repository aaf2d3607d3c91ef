"""Which claims are recorded on an instance at first issuance: no token noise or
anything that could be a secret, bounded in size."""

from __future__ import annotations

import json

import pytest

from broker.identity.recorded import MAX_RECORDED_BYTES, NOT_RECORDED, recorded_claims


@pytest.mark.parametrize("claims,expected", [
    ({"team": "pay", "n": 3, "ok": True, "f": 1.5}, {"team": "pay", "n": 3, "ok": True, "f": 1.5}),
    ({"groups": ["a", "b"]}, {"groups": ["a", "b"]}),
    ({"groups": ["a", 1]}, {}),
    ({"kubernetes.io": {"namespace": "x"}}, {}),
    ({"jti": "abc", "exp": 1, "iat": 1, "nbf": 1, "nonce": "n", "at_hash": "h"}, {}),
    ({"long": "x" * 257, "short": "x" * 256}, {"short": "x" * 256}),
    ({"nan": float("nan"), "inf": float("inf")}, {}),
    ({"null": None}, {}),
    ({"": "empty key", "k" * 129: "long key"}, {}),
    ({"many": ["a"] * 33}, {}),
], ids=["scalars", "string_list", "mixed_list", "nested_object", "token_noise", "long_value",
        "non_finite", "null", "bad_keys", "long_list"])
def test_recorded_claims(claims, expected):
    assert recorded_claims(claims) == expected


def test_token_ids_and_times_are_never_recorded():
    assert {"jti", "exp", "iat", "nbf"} <= NOT_RECORDED


def test_the_record_is_capped_and_keeps_what_fits():
    claims = {f"k{i:03d}": "v" * 200 for i in range(40)}
    claims["zz"] = "small"
    kept = recorded_claims(claims)
    assert len(json.dumps(kept, separators=(",", ":"))) <= MAX_RECORDED_BYTES
    assert "k000" in kept and kept["zz"] == "small" and len(kept) < len(claims)
