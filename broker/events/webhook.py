"""The event webhook's authentication and body: pure, so every refusal is tested directly.

An event pipeline (a cloud function, an alert handler) terminates instances with
``POST /v1/events/terminate``. It signs each request with a shared secret:

    X-Broker-Timestamp: <unix seconds>
    X-Broker-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>

The timestamp is inside the signature, so a captured request cannot be re-dated; one
outside ``window_s`` of the broker's clock is refused; and a signature is accepted once
(the store remembers it until its timestamp leaves the window), so a captured request
cannot be replayed inside the window either. Several secrets may be configured at once,
so a secret can be rotated without dropping events.

Body: ``{"instance_ids": ["i-1", ...], "issuer": "name"?, "reason": "text"?}``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from broker.errors import BadRequest, EventUnauthorized
from broker.identity.verify import valid_instance_id

TIMESTAMP_HEADER = "X-Broker-Timestamp"
SIGNATURE_HEADER = "X-Broker-Signature"
_SIGNATURE = re.compile(r"^sha256=([0-9a-f]{64})\Z")
_TIMESTAMP = re.compile(r"^[0-9]{1,12}\Z")
_ISSUER = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")
MAX_REASON = 200


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature header's value for a request (what a sender computes)."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secrets: Sequence[bytes],
    *,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    now: float,
    window_s: int,
) -> tuple[str, int]:
    """Check a request's signature and freshness. Returns (signature digest, timestamp):
    the digest is what the replay record keeps. Raises ``EventUnauthorized``; the message
    says what to fix without revealing which secret or what was expected."""
    if not timestamp or not signature:
        raise EventUnauthorized(
            f"sign the request: send {TIMESTAMP_HEADER} and {SIGNATURE_HEADER}",
            code="event_signature_missing",
        )
    ts_match = _TIMESTAMP.match(timestamp)
    sig_match = _SIGNATURE.match(signature.strip().lower())
    if ts_match is None:
        raise EventUnauthorized(
            f"{TIMESTAMP_HEADER} must be a Unix time in seconds", code="event_timestamp_invalid"
        )
    if sig_match is None:
        raise EventUnauthorized(
            f"{SIGNATURE_HEADER} must be 'sha256=' and 64 hex digits",
            code="event_signature_invalid",
        )
    presented = "sha256=" + sig_match.group(1)
    # Every secret is compared (no early exit), in constant time each.
    ok = False
    for secret in secrets:
        ok |= hmac.compare_digest(sign(secret, timestamp, body), presented)
    if not ok:
        raise EventUnauthorized("the signature does not match", code="event_signature_invalid")
    ts = int(timestamp)
    if abs(now - ts) > window_s:
        raise EventUnauthorized(
            f"the timestamp is more than {window_s}s from the broker's clock; "
            "sign with the current time",
            code="event_expired",
        )
    return sig_match.group(1), ts


@dataclass(frozen=True)
class TerminateEvent:
    instance_ids: tuple[str, ...]
    issuer: str | None
    reason: str | None


def parse(body: bytes, *, max_instances: int) -> TerminateEvent:
    """The body of a (verified) terminate event. Raises ``BadRequest``."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON", code="malformed_json") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object", code="malformed_json")
    unknown = set(data) - {"instance_ids", "issuer", "reason"}
    if unknown:
        raise BadRequest(
            "the body has fields the broker does not take; allowed: instance_ids, issuer, reason",
            code="unknown_field",
        )
    ids = data.get("instance_ids")
    if (
        not isinstance(ids, list)
        or not 1 <= len(ids) <= max_instances
        or not all(isinstance(i, str) for i in ids)
    ):
        raise BadRequest(
            f"'instance_ids' must be a list of 1 to {max_instances} instance ids",
            code="invalid_instance_ids",
        )
    if not all(valid_instance_id(i) for i in ids):
        raise BadRequest(
            "an instance id is 1-254 of [A-Za-z0-9._:@/-], starting with a letter or digit",
            code="invalid_instance_id",
        )
    issuer = data.get("issuer")
    if issuer is not None and (not isinstance(issuer, str) or not _ISSUER.match(issuer)):
        raise BadRequest("'issuer' must be the name of a configured issuer", code="invalid_issuer")
    reason = data.get("reason")
    # A NUL is refused here: the store cannot hold one (it was a 503, sent again forever).
    if reason is not None and (
        not isinstance(reason, str) or len(reason) > MAX_REASON or "\x00" in reason
    ):
        raise BadRequest(
            f"'reason' must be a string of at most {MAX_REASON} characters, without NUL",
            code="invalid_reason",
        )
    return TerminateEvent(tuple(dict.fromkeys(ids)), issuer, reason)
