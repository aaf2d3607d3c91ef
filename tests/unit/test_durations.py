"""Durations as the configuration and the API write them: parsing and range."""

from __future__ import annotations

from typing import Any

import pytest

from broker.durations import MAX_SECONDS, parse_duration

PARSE_OK = [
    ("90s", 90), ("10m", 600), ("1h30m", 5400), (3600, 3600), ("0s", 0), ("0", 0), (0, 0),
    ("3600", 3600), ("1d", 86400), ("2h0m5s", 7205), ("1500ms", 1), ("999ms", 0),
    (" 10m ", 600), (90.9, 90), (MAX_SECONDS, MAX_SECONDS), ("3650d", MAX_SECONDS),
]


@pytest.mark.parametrize(("value", "expected"), PARSE_OK, ids=[repr(v) for v, _ in PARSE_OK])
def test_parse_duration_valid(value: Any, expected: int) -> None:
    result = parse_duration(value)
    assert result == expected
    assert type(result) is int


FORMAT = "expected a duration like '10m', '1h30m' or a number of seconds"
RANGE = r"duration out of range \(0 to 10 years\)"
PARSE_BAD = [
    ("", FORMAT), ("   ", FORMAT), ("10x", FORMAT), ("-5s", FORMAT), ("1h 30m", FORMAT),
    (True, FORMAT), (False, FORMAT), ("h", FORMAT), ("s10", FORMAT), ("1.5h", FORMAT),
    ("10m-", FORMAT), ("10M", FORMAT), ("1h30", FORMAT), ("+5s", FORMAT), ("0x10", FORMAT),
    ("99999999d", RANGE), ("3651d", RANGE), (MAX_SECONDS + 1, RANGE), (-1, RANGE),
    (-0.5, RANGE), (float("inf"), RANGE),
    # only ASCII digits: str.isdigit() alone would take these (float() parses the first two)
    ("\u0663", FORMAT), ("\uff11\uff10", FORMAT), ("\u00b3", FORMAT), ("1\u0660", FORMAT),
]


@pytest.mark.parametrize(("value", "message"), PARSE_BAD, ids=[repr(v) for v, _ in PARSE_BAD])
def test_parse_duration_invalid(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


def test_parse_duration_error_quotes_input_truncated() -> None:
    with pytest.raises(ValueError) as info:
        parse_duration("x" * 100)
    assert str(info.value) == f"{FORMAT}, got {'x' * 32!r}"


COMPOUND_CASES = [
    (0, "0s"), (1, "1s"), (59, "59s"), (60, "1m"), (90, "1m30s"), (600, "10m"),
    (3600, "1h"), (3601, "1h1s"), (3661, "1h1m1s"), (5400, "1h30m"), (86400, "24h"),
    (7322, "2h2m2s"),
]


@pytest.mark.parametrize(("seconds", "text"), COMPOUND_CASES,
                         ids=[str(s) for s, _ in COMPOUND_CASES])
def test_parse_duration_compound_units(seconds: int, text: str) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("value", ["\u0663s", "\uff11\uff10m", "1\u0660s"],
                         ids=["arabic-indic-3s", "fullwidth-10m", "ascii-then-arabic-0"])
def test_parse_duration_unit_form_refuses_non_ascii_digits(value: str) -> None:
    with pytest.raises(ValueError, match=FORMAT):
        parse_duration(value)
