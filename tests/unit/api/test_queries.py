"""The admin GET endpoints' query strings: unknown and repeated parameters refused, and
each value read with its check."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from aiohttp.test_utils import make_mocked_request

from broker.api.queries import decode_cursor, encode_cursor, parse_time, query_params
from broker.errors import BadRequest


def q(path: str, allowed=("state", "limit", "after", "since")):
    return query_params(make_mocked_request("GET", path), allowed)


def refused(path: str, allowed=("state", "limit", "after", "since")) -> tuple[str, str]:
    with pytest.raises(BadRequest) as caught:
        q(path, allowed).limit() if "limit" in path else q(path, allowed)
    return caught.value.code, caught.value.message


@pytest.mark.parametrize("path,code,message", [
    ("/x?stat=done", "unknown_query",
     "unknown query parameter 'stat'; this endpoint takes: after, limit, since, state"),
    ("/x?b=1&a=2", "unknown_query",
     "unknown query parameter 'a', 'b'; this endpoint takes: after, limit, since, state"),
    ("/x?state=a&state=b", "invalid_query", "query parameter 'state' is given more than once"),
    ("/x?limit=0", "invalid_query", "limit must be between 1 and 1000"),
    ("/x?limit=1001", "invalid_query", "limit must be between 1 and 1000"),
    ("/x?limit=ten", "invalid_query", "limit must be an integer"),
], ids=["unknown", "two_unknown_sorted", "repeated", "limit_zero", "limit_high", "limit_text"])
def test_refusals_say_what_is_allowed(path, code, message):
    assert refused(path) == (code, message)


def test_an_endpoint_without_parameters_says_so():
    with pytest.raises(BadRequest) as caught:
        q("/x?vault=true", ())
    assert caught.value.message == (
        "unknown query parameter 'vault'; this endpoint takes: none")


def test_values_read_with_their_checks():
    query = q("/x?state=done&limit=5&since=2026-12-02T10:00:00Z")
    assert query.text("state", {"done", "failed"}) == "done"
    assert query.limit() == 5 and q("/x").limit() == 100 and q("/x?limit=").limit() == 100
    assert query.time("since") == datetime(2026, 12, 2, 10, tzinfo=UTC)
    assert query.cursor() is None and query.text("after") is None
    with pytest.raises(BadRequest) as caught:
        query.text("state", {"pending"})
    assert caught.value.message == "query parameter 'state' is not valid; one of pending"
    with pytest.raises(BadRequest):
        q("/x?state=" + "x" * 256).text("state")


def test_a_nul_in_a_value_is_refused_before_it_reaches_the_store():
    """PostgreSQL refuses a NUL in a query: it was answered 503 store_unavailable."""
    with pytest.raises(BadRequest) as caught:
        q("/x?state=a%00b").text("state")
    assert caught.value.code == "invalid_query"


@pytest.mark.parametrize("value,expected", [
    ("2026-12-02T10:00:00Z", datetime(2026, 12, 2, 10, tzinfo=UTC)),
    ("2026-12-02T10:00:00", datetime(2026, 12, 2, 10, tzinfo=UTC)),
    ("2026-12-02T12:00:00+02:00", datetime(2026, 12, 2, 10, tzinfo=UTC)),
    ("2026-12-02", datetime(2026, 12, 2, tzinfo=UTC)),
], ids=["z", "naive_is_utc", "offset", "date"])
def test_times(value, expected):
    assert parse_time("since", value) == expected


def test_a_bad_time_names_the_format():
    with pytest.raises(BadRequest) as caught:
        parse_time("since", "yesterday")
    assert caught.value.code == "invalid_query"
    assert "ISO 8601 time like 2026-12-02T10:00:00Z" in caught.value.message


@pytest.mark.parametrize("at,key", [
    (datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC), "i-a/b:c@d"),
    (datetime(2026, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))), "j-" + "f" * 32),
], ids=["microseconds_and_odd_id", "offset_normalised"])
def test_cursors_round_trip_exactly(at, key):
    cursor = encode_cursor(at, key)
    assert "=" not in cursor and "|" not in cursor
    assert decode_cursor(cursor) == (at, key)
    assert q(f"/x?after={cursor}").cursor() == (at, key)


@pytest.mark.parametrize("cursor", ["!!!", "bm90IGEgY3Vyc29y", encode_cursor(
    datetime(2026, 1, 1, tzinfo=UTC), "x")[:-4], "MjAyNi0wMS0wMXw", "MjAyNi0wMS0wMVQwMDowMDowMHx4"],
    ids=["not_base64", "no_separator", "truncated", "no_id", "naive_time"])
def test_a_cursor_the_broker_did_not_give_is_refused(cursor):
    with pytest.raises(BadRequest) as caught:
        decode_cursor(cursor)
    assert (caught.value.code, caught.value.message) == (
        "invalid_query", "'after' is not a cursor this broker gave out")
