"""The event webhook's signature, freshness and body checks, as an attacker would try them."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from broker.errors import BadRequest, EventUnauthorized
from broker.events.webhook import parse, sign, verify

SECRET = b"s" * 32
OTHER = b"o" * 32
NOW = 1_800_000_000
BODY = json.dumps({"instance_ids": ["i-1"]}).encode()


def _verify(timestamp: str | None, signature: str | None, body: bytes = BODY,
            secrets: tuple[bytes, ...] = (SECRET,), now: float = NOW) -> tuple[str, int]:
    return verify(secrets, timestamp=timestamp, signature=signature, body=body, now=now,
                  window_s=300)


def test_sign_is_hmac_sha256_over_timestamp_dot_body() -> None:
    expected = hmac.new(SECRET, b"1800000000." + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, "1800000000", BODY) == "sha256=" + expected


def test_a_good_request_passes_and_names_its_digest() -> None:
    sig = sign(SECRET, str(NOW), BODY)
    assert _verify(str(NOW), sig) == (sig.removeprefix("sha256="), NOW)
    # Upper-case hex and surrounding space are the same signature.
    assert _verify(str(NOW), " " + sig.upper().replace("SHA256=", "sha256=") + " ")[1] == NOW


def test_any_configured_secret_verifies_so_secrets_can_rotate() -> None:
    sig = sign(OTHER, str(NOW), BODY)
    assert _verify(str(NOW), sig, secrets=(SECRET, OTHER))[1] == NOW


@pytest.mark.parametrize(("timestamp", "signature", "body", "code"), [
    (None, None, BODY, "event_signature_missing"),
    (str(NOW), None, BODY, "event_signature_missing"),
    (None, sign(SECRET, str(NOW), BODY), BODY, "event_signature_missing"),
    ("", sign(SECRET, str(NOW), BODY), BODY, "event_signature_missing"),
    (str(NOW), sign(OTHER, str(NOW), BODY), BODY, "event_signature_invalid"),
    (str(NOW), sign(SECRET, str(NOW), BODY), BODY + b" ", "event_signature_invalid"),
    (str(NOW), sign(SECRET, str(NOW), b'{"instance_ids": ["i-2"]}'), BODY,
     "event_signature_invalid"),
    # the timestamp is signed: re-dating a captured request breaks the signature
    (str(NOW + 1), sign(SECRET, str(NOW), BODY), BODY, "event_signature_invalid"),
    (str(NOW), "sha1=" + "0" * 40, BODY, "event_signature_invalid"),
    (str(NOW), "sha256=" + "0" * 63, BODY, "event_signature_invalid"),
    (str(NOW), "sha256=" + "g" * 64, BODY, "event_signature_invalid"),
    (str(NOW), sign(SECRET, str(NOW), BODY).removeprefix("sha256="), BODY,
     "event_signature_invalid"),
    (str(NOW), "sha256=" + "0" * 64, BODY, "event_signature_invalid"),
    (str(NOW - 301), sign(SECRET, str(NOW - 301), BODY), BODY, "event_expired"),
    (str(NOW + 301), sign(SECRET, str(NOW + 301), BODY), BODY, "event_expired"),
    ("1800000000.5", sign(SECRET, "1800000000.5", BODY), BODY, "event_timestamp_invalid"),
    ("-1", sign(SECRET, "-1", BODY), BODY, "event_timestamp_invalid"),
    ("\u0661\u0668", sign(SECRET, "1", BODY), BODY, "event_timestamp_invalid"),
    ("9" * 40, sign(SECRET, "9" * 40, BODY), BODY, "event_timestamp_invalid"),
], ids=["nothing", "no-signature", "no-timestamp", "empty-timestamp", "wrong-secret",
        "body-changed", "signed-other-body", "re-dated", "sha1", "short-hex", "non-hex",
        "bare-hex", "zeros", "stale", "future", "fractional-ts", "negative-ts",
        "arabic-digits-ts", "huge-ts"])
def test_refusals(timestamp: str | None, signature: str | None, body: bytes,
                  code: str) -> None:
    with pytest.raises(EventUnauthorized) as info:
        _verify(timestamp, signature, body)
    assert info.value.code == code
    assert info.value.status == 401
    assert SECRET.decode() not in info.value.message


def test_window_edges_are_inclusive() -> None:
    for ts in (NOW - 300, NOW + 300):
        assert _verify(str(ts), sign(SECRET, str(ts), BODY))[1] == ts


def test_parse_takes_ids_issuer_and_reason_and_drops_duplicates() -> None:
    event = parse(json.dumps({"instance_ids": ["i-1", "pod/ns:x", "i-1"], "issuer": "k8s",
                              "reason": "ASG scale-in"}).encode(), max_instances=10)
    assert event.instance_ids == ("i-1", "pod/ns:x")
    assert (event.issuer, event.reason) == ("k8s", "ASG scale-in")


@pytest.mark.parametrize(("body", "code"), [
    (b"not json", "malformed_json"),
    (b"\xff\xfe", "malformed_json"),
    (b"[]", "malformed_json"),
    (b'"i-1"', "malformed_json"),
    (b"{}", "invalid_instance_ids"),
    (b'{"instance_ids": []}', "invalid_instance_ids"),
    (b'{"instance_ids": "i-1"}', "invalid_instance_ids"),
    (b'{"instance_ids": [1]}', "invalid_instance_ids"),
    (json.dumps({"instance_ids": [f"i-{n}" for n in range(11)]}).encode(),
     "invalid_instance_ids"),
    (b'{"instance_ids": ["../admin"]}', "invalid_instance_id"),
    (b'{"instance_ids": ["a/../b"]}', "invalid_instance_id"),
    (b'{"instance_ids": [""]}', "invalid_instance_id"),
    (b'{"instance_ids": ["i 1"]}', "invalid_instance_id"),
    (json.dumps({"instance_ids": ["i-" + "x" * 300]}).encode(), "invalid_instance_id"),
    (b'{"instance_ids": ["i-1"], "issuer": "Dev"}', "invalid_issuer"),
    (b'{"instance_ids": ["i-1"], "issuer": 3}', "invalid_issuer"),
    (b'{"instance_ids": ["i-1"], "reason": 3}', "invalid_reason"),
    (json.dumps({"instance_ids": ["i-1"], "reason": "x" * 201}).encode(), "invalid_reason"),
    (b'{"instance_ids": ["i-1"], "reason": "a\\u0000b"}', "invalid_reason"),
    (b'{"instance_ids": ["i-1"], "admin": true}', "unknown_field"),
], ids=["text", "binary", "array", "string", "empty", "no-ids", "ids-string", "ids-number",
        "too-many", "dotdot", "dotdot-segment", "empty-id", "space", "too-long",
        "issuer-case", "issuer-number", "reason-number", "reason-long", "reason-nul",
        "unknown-field"])
def test_parse_refusals(body: bytes, code: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse(body, max_instances=10)
    assert info.value.code == code
