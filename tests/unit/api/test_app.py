"""API id patterns: a trailing newline is refused (the patterns once ended in '$', which also
matches before a final '\\n')."""

from __future__ import annotations

from typing import Any

import pytest

from broker.api.decode import LEASE_ID_PATTERN, ROLE_PATTERN


@pytest.mark.parametrize(("pattern", "good"), [(ROLE_PATTERN, "dev-cert"),
                                               (LEASE_ID_PATTERN, "l-" + "0f" * 16)],
                         ids=["role", "lease-id"])
def test_api_id_patterns_refuse_trailing_newline(pattern: Any, good: str) -> None:
    assert pattern.match(good)
    assert not pattern.match(good + "\n")
