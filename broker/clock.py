"""Time as a collaborator, so that expiry, backoff and token checks are testable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol


def iso_z(dt: datetime) -> str:
    """An aware datetime as the API writes it: ISO 8601 in UTC with a trailing Z."""
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class FixedClock:
    """A clock that moves only when told to; for tests."""

    def __init__(self, at: datetime) -> None:
        self._at = at

    def now(self) -> datetime:
        return self._at

    def advance(self, seconds: float) -> None:
        self._at = self._at + timedelta(seconds=seconds)
