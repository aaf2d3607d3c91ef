"""Go-style durations as Vault writes them: ``90s``, ``10m``, ``1h30m``, or plain seconds."""

from __future__ import annotations

import re

_PART = re.compile(r"([0-9]+)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_SECONDS = 10 * 365 * 86400


def parse_duration(value: str | int | float) -> int:
    """Whole seconds in ``value``; ``ValueError`` with what was expected otherwise."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '10m', '1h30m' or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        if not text:
            raise ValueError("expected a duration like '10m', '1h30m' or a number of seconds")
        if text.isascii() and text.isdigit():
            seconds = float(text)
        else:
            pos, seconds = 0, 0.0
            for match in _PART.finditer(text):
                if match.start() != pos:
                    break
                seconds += int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
                pos = match.end()
            if pos != len(text) or pos == 0:
                raise ValueError(
                    f"expected a duration like '10m', '1h30m' or a number of seconds, "
                    f"got {text[:32]!r}"
                )
    if seconds < 0 or seconds > MAX_SECONDS:
        raise ValueError("duration out of range (0 to 10 years)")
    return int(seconds)
