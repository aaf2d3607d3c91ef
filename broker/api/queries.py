"""Query strings of the admin API's GET endpoints.

Every admin GET handler starts with ``query_params(request, allowed)``: a parameter it
does not take is refused with 400 ``unknown_query`` naming the ones it does (as an
unknown body field is refused with ``unknown_field``), and a repeated one with
``invalid_query`` (``?instance=a&instance=b`` must not quietly mean one of them). The
``Query`` it returns reads each value with its check: text, a choice, a limit, a time,
a page cursor. Pure but for reading the request.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Collection, Mapping
from datetime import UTC, datetime

from aiohttp import web

from broker.errors import BadRequest

MAX_VALUE = 255
# What a text query parameter may be, for the OpenAPI document: up to 255 characters, no NUL.
TEXT_PATTERN = "^[^\\u0000]*$"
MAX_PAGE = 1000


def _invalid(message: str) -> BadRequest:
    return BadRequest(message, code="invalid_query")


def encode_cursor(at: datetime, key: str) -> str:
    """An opaque page cursor for a listing ordered by (time, id): where the next page
    starts. Opaque so that callers pass it back instead of building one."""
    raw = f"{at.astimezone(UTC).isoformat()}|{key}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, sep, key = raw.partition("|")
        when = datetime.fromisoformat(at)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise _invalid("'after' is not a cursor this broker gave out") from None
    if not sep or not key or when.tzinfo is None:
        raise _invalid("'after' is not a cursor this broker gave out")
    return when, key


def parse_time(name: str, value: str) -> datetime:
    """An ISO 8601 time (``2026-12-02T10:00:00Z``); one without a zone is UTC."""
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise _invalid(f"{name!r} must be an ISO 8601 time like 2026-12-02T10:00:00Z") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


class Query:
    """The checked query string of one request."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = values

    def text(self, name: str, choices: Collection[str] | None = None) -> str | None:
        value = self._values.get(name)
        if value is None or value == "":
            return None
        # NUL: no store can hold it (PostgreSQL refuses the query: it was a 503).
        bad = len(value) > MAX_VALUE or "\x00" in value
        if bad or (choices is not None and value not in choices):
            hint = f"; one of {', '.join(sorted(choices))}" if choices else ""
            raise _invalid(f"query parameter {name!r} is not valid{hint}")
        return value

    def number(self, name: str, default: int, *, low: int, high: int) -> int:
        value = self._values.get(name)
        if value is None or value == "":
            return default
        try:
            number = int(value)
        except ValueError:
            raise _invalid(f"{name} must be an integer") from None
        if not low <= number <= high:
            raise _invalid(f"{name} must be between {low} and {high}")
        return number

    def limit(self, default: int = 100) -> int:
        return self.number("limit", default, low=1, high=MAX_PAGE)

    def time(self, name: str) -> datetime | None:
        value = self.text(name)
        return None if value is None else parse_time(name, value)

    def cursor(self) -> tuple[datetime, str] | None:
        value = self.text("after")
        return None if value is None else decode_cursor(value)


def query_params(request: web.Request, allowed: Collection[str]) -> Query:
    """The request's query string, refused if it names a parameter outside ``allowed``
    (400 ``unknown_query``) or gives one twice (400 ``invalid_query``). Every admin GET
    handler calls this first, with the parameters it takes (an empty set for none)."""
    query = request.query
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        takes = ", ".join(sorted(allowed)) if allowed else "none"
        raise BadRequest(
            f"unknown query parameter {', '.join(repr(u) for u in unknown)[:200]}; "
            f"this endpoint takes: {takes}",
            code="unknown_query",
        )
    for name in query:
        if len(query.getall(name)) > 1:
            raise _invalid(f"query parameter {name!r} is given more than once")
    return Query({name: query[name] for name in query})
