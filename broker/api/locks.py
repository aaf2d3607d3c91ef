"""What a lock request may say, checked before anything is written: refused as a whole
with ``invalid_lock`` (``ttl``, ``reason`` and ``incident`` are read by the handler
with the helpers every admin action shares)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from broker.errors import BadRequest
from broker.leases.locks import LOCK_KINDS

LOCK_ID_PATTERN = re.compile(r"^k-[0-9a-f]{32}\Z")
ROLE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")
NAMES_SHOWN = 20
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


def _named(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN]) or "none"
    return shown + (f" … ({len(names)} in all)" if len(names) > NAMES_SHOWN else "")


def check_lock_target(
    kind: str, value: str, *, roles: Sequence[str], issuers: Mapping[str, str]
) -> None:
    """A role or issuer lock must name what can match: a configured role (a role name's
    pattern, exactly as configured), a configured issuer's *name* (``issuers``: name to its
    URL; a lock given the URL is told the name). Refused with ``invalid_lock`` naming what
    exists; a lock that could never match would only look like protection."""
    if kind == "role" and value not in roles:
        hint = "" if ROLE_PATTERN.match(value) else " (a role name is lower-case: a-z 0-9 _ -)"
        raise BadRequest(
            f"no role {value!r} is configured{hint}; configured roles: {_named(sorted(roles))}",
            code="invalid_lock",
        )
    if kind == "issuer" and value not in issuers:
        url = value.rstrip("/")
        by_url = sorted(n for n, u in issuers.items() if u.rstrip("/") == url)
        hint = f"; that is the URL of issuer {by_url[0]!r}: lock its name" if by_url else ""
        raise BadRequest(
            f"no issuer named {value!r}{hint}; configured issuers: {_named(sorted(issuers))}",
            code="invalid_lock",
        )
