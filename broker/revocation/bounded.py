"""How many Vault calls one revocation worker or reconciler has in flight at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
VAULT_CONCURRENCY = 16


class Bounded:
    """Runs calls at most ``limit`` at a time: ``await bounded(fn, *args)``."""

    def __init__(self, limit: int = VAULT_CONCURRENCY) -> None:
        self._sem = asyncio.Semaphore(limit)

    async def __call__(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        async with self._sem:
            return await fn(*args)
