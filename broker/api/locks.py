"""What a lock request may say, checked before anything is written: refused as a whole
with ``invalid_lock`` (``ttl``, ``reason`` and ``incident`` are read by the handler
with the helpers every admin action shares)."""

from __future__ import annotations

import re
from typing import Any

from broker.errors import BadRequest
from broker.leases.locks import LOCK_KINDS

LOCK_ID_PATTERN = re.compile(r"^k-[0-9a-f]{32}\Z")
MAX_LOCK_VALUE = 255
MAX_CLAIM_NAME = 128


def valid_lock_id(lock_id: str) -> bool:
    return bool(LOCK_ID_PATTERN.match(lock_id))


def _text(value: Any, limit: int) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= limit
        and value.isprintable()
        and value == value.strip()
    )


def lock_request(body: dict[str, Any]) -> dict[str, Any]:
    """``kind``, ``value`` and ``claim`` of a lock request; the ``reason`` is required."""

    def bad(message: str) -> BadRequest:
        return BadRequest(message, code="invalid_lock")

    kind, value, claim = body.get("kind"), body.get("value"), body.get("claim")
    if kind not in LOCK_KINDS:
        raise bad(f"'kind' is required: one of {', '.join(LOCK_KINDS)}")
    if not _text(value, MAX_LOCK_VALUE):
        raise bad(
            f"'value' is required: the {kind} to lock, 1-{MAX_LOCK_VALUE} printable "
            "characters without surrounding spaces"
        )
    if kind == "claim" and not _text(claim, MAX_CLAIM_NAME):
        raise bad("a claim lock needs 'claim': the claim's name (nested: a.b)")
    if kind != "claim" and claim is not None:
        raise bad("'claim' applies to kind claim only")
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise bad("'reason' is required: why the lock is in place")
    return {"kind": kind, "value": value, "claim": claim if kind == "claim" else None}
