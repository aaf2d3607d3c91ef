"""Which lock refuses a request. Pure: the active locks are read from the store on every
issuance and renewal (the table is tiny and indexed), so a lock takes effect on every
replica at once; this decides whether one of them matches.

A lock names a workload, an issuer (by its configured name), a role, or a claim's value
(``claim`` names the claim: a name, or a dotted path into nested claims; a claim whose
own name holds a dot, like ``kubernetes.io``, is found too). A claim matches when it
equals the value, as text for a number or a boolean, or when it is a list holding the
value (``groups``). Nothing else matches: a lock never refuses more than it names, and never less.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.leases.views import LockView

LOCK_KINDS = ("workload", "issuer", "role", "claim")


@dataclass(frozen=True)
class LockSubject:
    """What a lock can name about a request."""

    issuer: str
    workload: str
    role: str
    claims: Mapping[str, Any]


def is_active(lock: LockView, now: datetime) -> bool:
    return lock.removed_at is None and (lock.expires_at is None or lock.expires_at > now)


def _as_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int):
        return str(value)
    return None


def claim_value(claims: Mapping[str, Any], name: str) -> Any:
    """A claim by a name that may be a dotted path. At each level the longest name that
    exists wins, so ``kubernetes.io.namespace`` finds ``{"kubernetes.io": {"namespace":
    …}}`` and a top-level ``a.b`` shadows ``{"a": {"b": …}}``. Absent: None."""
    return _walk(claims, name.split("."))


def _walk(node: Any, parts: list[str]) -> Any:
    if not parts:
        return node
    if not isinstance(node, Mapping):
        return None
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in node:
            return _walk(node[key], parts[i:])
    return None


def claim_matches(claims: Mapping[str, Any], name: str, value: str) -> bool:
    found = claim_value(claims, name)
    items = found if isinstance(found, list) else [found]
    return any(_as_text(item) == value for item in items)


def matches(lock: LockView, subject: LockSubject) -> bool:
    if lock.kind == "workload":
        return subject.workload == lock.value
    if lock.kind == "issuer":
        return subject.issuer == lock.value
    if lock.kind == "role":
        return subject.role == lock.value
    if lock.kind == "claim" and lock.claim:
        return claim_matches(subject.claims, lock.claim, lock.value)
    return False


def refusing_lock(
    locks: Iterable[LockView], subject: LockSubject, now: datetime
) -> LockView | None:
    """The oldest active lock that matches ``subject`` (the same one on every replica), or
    None."""
    hits = [lock for lock in locks if is_active(lock, now) and matches(lock, subject)]
    return min(hits, key=lambda lock: (lock.created_at, lock.lock_id)) if hits else None
