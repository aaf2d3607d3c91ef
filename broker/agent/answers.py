"""The broker's answers read into the agent's values, pure. An answer that is not what
the API documents (a missing field, a time without its zone, a lease id of another shape)
is ``AnswerUnreadable``, which the agent treats like an unavailable broker; the message
names the field, never a value."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.agent.render import Issued
from broker.agent.state import LEASE_ID, Lease


class AnswerUnreadable(ValueError):
    pass


def _time(body: dict[str, Any], key: str) -> datetime:
    value = body.get(key)
    if not isinstance(value, str):
        raise AnswerUnreadable(f"no {key}")
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise AnswerUnreadable(f"{key} is not a time") from None
    if dt.tzinfo is None:
        raise AnswerUnreadable(f"{key} has no time zone")
    return dt


def issued(body: dict[str, Any], now: datetime) -> tuple[Lease, Issued]:
    """``POST /v1/credentials``' 201: the lease to keep, and the credential to write."""
    lease_id, kind, data = body.get("lease_id"), body.get("kind"), body.get("data")
    if not isinstance(lease_id, str) or not LEASE_ID.match(lease_id):
        raise AnswerUnreadable("no lease_id")
    if not isinstance(kind, str) or not isinstance(data, dict):
        raise AnswerUnreadable("no kind or data")
    expires_at = _time(body, "expires_at")
    lease = Lease(
        lease_id=lease_id,
        leased=body.get("leased", True) is not False,
        renewable=body.get("renewable") is True,
        issued_at=_time(body, "issued_at"),
        expires_at=expires_at,
        seen_at=now,
    )
    return lease, Issued(kind, data, expires_at)


@dataclass(frozen=True)
class Renewal:
    """``POST /v1/leases/{id}/renew``' 200."""

    expires_at: datetime
    renewable: bool
    max_expires_at: datetime | None
    near_max_ttl: bool


def renewal(body: dict[str, Any]) -> Renewal:
    return Renewal(
        expires_at=_time(body, "expires_at"),
        renewable=body.get("renewable") is True,
        max_expires_at=_time(body, "max_expires_at") if body.get("max_expires_at") else None,
        near_max_ttl=body.get("near_max_ttl") is True,
    )
