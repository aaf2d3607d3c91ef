"""Retry delays: exponential with jitter, for everything that retries a remote (the
revocation worker, the termination sources). Pure."""

from __future__ import annotations


def retry_delay(attempt: int, *, base: float, cap: float, jitter: float) -> float:
    """Delay before retry number ``attempt`` (1-based). ``jitter`` in [0, 1) spreads the
    second half of the delay ("equal jitter") so replicas retrying together drift apart."""
    if attempt < 1:
        attempt = 1
    exp: float = min(cap, base * (2 ** min(attempt - 1, 30)))
    return exp / 2 + (exp / 2) * max(0.0, min(jitter, 1.0))
