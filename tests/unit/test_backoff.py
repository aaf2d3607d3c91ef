"""Retry backoff of revocation jobs: exponential, capped, jittered."""

from __future__ import annotations

import itertools

import pytest

from broker.backoff import retry_delay

DELAY_CASES = [
    # attempt, base, cap, jitter, expected
    (1, 1.0, 300.0, 0.0, 0.5, "first-no-jitter"),
    (1, 1.0, 300.0, 1.0, 1.0, "first-full-jitter"),
    (2, 1.0, 300.0, 0.0, 1.0, "second-no-jitter"),
    (3, 1.0, 300.0, 0.5, 3.0, "third-half-jitter"),
    (4, 2.0, 300.0, 1.0, 16.0, "base-two"),
    (9, 1.0, 300.0, 1.0, 256.0, "below-cap"),
    (10, 1.0, 300.0, 1.0, 300.0, "capped-full-jitter"),
    (10, 1.0, 300.0, 0.0, 150.0, "capped-no-jitter"),
    (1000, 1.0, 300.0, 0.0, 150.0, "huge-attempt-capped"),
    (100, 2.0, 1e12, 1.0, 2.0 * 2**30, "exponent-bounded-at-30"),
    (0, 1.0, 300.0, 1.0, 1.0, "attempt-zero-as-one"),
    (-3, 1.0, 300.0, 1.0, 1.0, "negative-attempt-as-one"),
    (2, 1.0, 300.0, 5.0, 2.0, "jitter-above-one-clamped"),
    (2, 1.0, 300.0, -5.0, 1.0, "jitter-negative-clamped"),
    (3, 10.0, 15.0, 1.0, 15.0, "cap-below-second-step"),
]


@pytest.mark.parametrize(("attempt", "base", "cap", "jitter", "expected"),
                         [c[:5] for c in DELAY_CASES], ids=[c[5] for c in DELAY_CASES])
def test_retry_delay(attempt: int, base: float, cap: float, jitter: float,
                     expected: float) -> None:
    assert retry_delay(attempt, base=base, cap=cap, jitter=jitter) == pytest.approx(expected)


@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.5, 0.999, 1.0], ids=lambda j: f"j{j}")
def test_retry_delay_grows_exponentially_then_caps(jitter: float) -> None:
    base, cap = 0.5, 100.0
    delays = [retry_delay(n, base=base, cap=cap, jitter=jitter) for n in range(1, 21)]
    for n, d in enumerate(delays, start=1):
        exp = min(cap, base * 2 ** (n - 1))
        assert exp / 2 <= d <= exp, (n, d, exp)
        assert d == pytest.approx(exp / 2 + exp / 2 * jitter)
    for prev, nxt in itertools.pairwise(delays):
        assert nxt == pytest.approx(min(prev * 2, cap / 2 + cap / 2 * jitter))
    assert delays[-1] == pytest.approx(cap / 2 + cap / 2 * jitter)
