"""Waiting for what the system does after it answers: the one bounded poll of the tests.

A test that needs something to have happened (a revocation job finished, a session cut, a
server up) polls for it with ``eventually`` instead of sleeping a fixed time: it goes on
as soon as the thing is true, and fails naming what did not happen. The default bound is
generous, because the machine the suite runs on may be busy; a test that proves something
does *not* happen lets the time pass with a plain sleep and says so.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

TIMEOUT_S = 30.0

Described = str | Callable[[], str]


def _describe(what: Described) -> str:
    return what() if callable(what) else what


async def eventually(
    condition: Callable[[], T | Awaitable[T]],
    what: Described,
    timeout: float = TIMEOUT_S,
    interval: float = 0.05,
) -> T:
    """Poll ``condition`` (plain or async) until it returns something true, and return
    that. After ``timeout`` seconds fail with ``what``: a string, or a function that
    describes the last state seen when it is called."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if loop.time() >= deadline:
            raise AssertionError(f"not within {timeout}s: {_describe(what)}")
        await asyncio.sleep(interval)


def eventually_sync(
    condition: Callable[[], T],
    what: Described,
    timeout: float = TIMEOUT_S,
    interval: float = 0.2,
) -> T:
    """``eventually`` for code that runs outside the event loop (starting test servers)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout}s: {_describe(what)}")
        time.sleep(interval)
