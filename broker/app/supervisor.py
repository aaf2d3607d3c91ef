"""Runs the broker's long-running parts and periodic ticks together, and stops them together.

A ``Part`` works until its ``stop`` event is set; raising is a fatal failure. A ``Tick`` is
periodic work driven by APScheduler; a tick that raises logs the error and carries on,
since the next run retries it (work done by ticks is claimed from a ledger). A part that
may die transiently (a termination source) is wrapped in ``Restarting``.

Order: ``Supervisor.run`` starts the parts in list order, then the ticks. When ``stop`` is
set from outside (SIGTERM) or a part fails, everything stops in reverse: the ticks first
(a running tick is waited for, bounded), then the parts from last to first, each asked in
turn and given its own ``stop_s`` before it is cancelled (the HTTP server drains the
requests in flight, which may be between Vault and the ledger, so it gets far longer than
a termination source finishing one event), then the closers, last registered first. So a
part may use every part listed before it until it has stopped itself, a tick may use
every part, and every part and tick may use every resource a closer closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from broker.errors import BrokerError

# How long a tick cancelled at shutdown is given to clean up before the clients close.
CANCELLED_TICK_S = 2.0
log = logging.getLogger(__name__)
# A part gets this long to finish what it has in hand once asked to stop (a termination
# source acknowledging its event); then it is cancelled.
PART_STOP_S = 5.0
# Running ticks get this long to finish when the broker stops; then they are cancelled,
# which is safe: a tick's claim on its work expires and another run takes it.
TICK_STOP_S = 5.0

Close = Callable[[], Awaitable[object]]


class Runnable(Protocol):
    name: str

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then return. Raising is a fatal failure."""


class Part(Runnable, Protocol):
    # How long the part may take, once asked to stop, to finish what it has in hand.
    stop_s: float


def _log_failure(message: str, exc: BaseException, level: int, **extra: object) -> None:
    """A ``BrokerError`` is logged by its code and message, which never hold a secret.
    Anything else escaped its package's translation: a bug, logged with its traceback."""
    if isinstance(exc, BrokerError):
        log.log(level, message, extra={**extra, "code": exc.code, "error": exc.message})
    else:
        log.log(level, message, exc_info=exc, extra=extra)


class Tick:
    """Periodic work: ``run_once`` every ``every_s`` seconds, never two runs at once, runs
    missed while one was running coalesced into one. ``at_start`` runs it as soon as the
    ticks start instead of one interval later. ``on_stop``: called when the ticks stop."""

    def __init__(
        self,
        name: str,
        every_s: float,
        run_once: Callable[[], Awaitable[object]],
        *,
        at_start: bool = False,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._on_stop = on_stop
        self.every_s = every_s
        self.at_start = at_start
        self._run_once = run_once
        self._scheduler: Any = None  # set while the ticks run
        self._again = False
        self._idle = asyncio.Event()
        self._idle.set()

    def kick(self) -> None:
        """Run now: at once if idle, else exactly once more after the running run (however
        many kicks came during it). Does nothing while the ticks are stopped."""
        if not self._idle.is_set():
            self._again = True
        elif self._scheduler is not None:
            self._scheduler.modify_job(self.name, next_run_time=datetime.now(UTC))

    @property
    def running(self) -> bool:
        return not self._idle.is_set()

    async def idle(self) -> None:
        """Return once no run is in progress."""
        await self._idle.wait()

    @property
    def attached(self) -> bool:
        """Scheduled, and taking kicks: between ``attach`` and ``detach``."""
        return self._scheduler is not None

    def detach(self) -> None:
        """Stop taking kicks (the scheduler is being shut down), and tell a run in progress
        to wrap up (``on_stop``) so it ends within the ticks' stop time."""
        self._scheduler = None
        if self._on_stop is not None:
            self._on_stop()

    def attach(self, scheduler: Any) -> None:
        """Schedule the tick on ``scheduler`` (an APScheduler ``AsyncIOScheduler``)."""
        self._scheduler = scheduler
        scheduler.add_job(
            self._fire,
            "interval",
            seconds=self.every_s,
            id=self.name,
            max_instances=1,
            coalesce=True,
            **({"next_run_time": datetime.now(UTC)} if self.at_start else {}),
        )

    async def _fire(self) -> None:
        self._idle.clear()
        try:
            while True:
                self._again = False
                await self._run_once()
                if not self._again:
                    break
        except Exception as exc:  # a tick logs and carries on; the next run retries
            _log_failure("tick failed", exc, logging.ERROR, tick=self.name)
        finally:
            self._idle.set()


@dataclass(frozen=True)
class Backoff:
    """How ``Restarting`` restarts a part: after ``first_s``, doubling up to ``max_s``. A
    run that lasted ``healthy_s`` starts the count again; ``give_up_after`` failures in a
    row, each quicker than that, make the failure fatal (about two minutes by default)."""

    first_s: float = 1.0
    max_s: float = 60.0
    healthy_s: float = 60.0
    give_up_after: int = 8

    def delay(self, failures: int) -> float:
        return min(self.first_s * 2.0 ** (failures - 1), self.max_s)


async def _pause(seconds: float, stop: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class Restarting:
    """A part that is restarted with backoff when it raises, and stops the broker only
    when it keeps failing.

    A run that returns before the broker asked it to stop is a failure too: a source
    that quietly ended would leave the broker deaf to terminations.

    Why not never give up: a termination source already retries every upstream failure
    inside its own loop, so one that keeps raising out of ``run`` is broken, and a broker
    that silently no longer hears terminations leaves credentials alive on dead instances
    until the reconciler notices. Exiting non-zero makes that visible to the orchestrator,
    which restarts the broker with fresh clients. Why not fatal at once: a client that
    failed on a passing outage (the API server restarting) deserves a few retries before
    the whole broker, which still issues and revokes, goes down.

    ``on_restart(name)`` is called at each restart (a metric hook); ``now`` and ``pause``
    are injected so that tests need not wait.
    """

    def __init__(
        self,
        part: Runnable,
        backoff: Backoff | None = None,
        *,
        on_restart: Callable[[str], None] | None = None,
        now: Callable[[], float] = time.monotonic,
        pause: Callable[[float, asyncio.Event], Awaitable[None]] = _pause,
    ) -> None:
        self.name = part.name
        self.stop_s = PART_STOP_S
        self._part = part
        self._backoff = backoff or Backoff()
        self._on_restart = on_restart
        self._now = now
        self._pause = pause

    async def run(self, stop: asyncio.Event) -> None:
        backoff, failures = self._backoff, 0
        while not stop.is_set():
            if failures and self._on_restart is not None:
                self._on_restart(self.name)
            started = self._now()
            try:
                await self._part.run(stop)
                if stop.is_set():
                    return
                raise RuntimeError(f"{self.name} stopped without being asked to")
            except Exception as exc:
                if stop.is_set():
                    raise
                healthy = self._now() - started >= backoff.healthy_s
                failures = 1 if healthy else failures + 1
                if failures >= backoff.give_up_after:
                    log.error("part keeps failing; giving up", extra={"part": self.name})
                    raise
                delay = backoff.delay(failures)
                extra = {"part": self.name, "failures": failures, "restart_in_s": delay}
                _log_failure("part failed; restarting it", exc, logging.WARNING, **extra)
                await self._pause(delay, stop)


class Supervisor:
    """Runs parts and ticks as one list (see the module docstring for the order), then
    the closers. Each part's ``stop_s`` and ``tick_stop_s`` bound how long a stop waits."""

    def __init__(self, *, tick_stop_s: float = TICK_STOP_S) -> None:
        self._tick_stop_s = tick_stop_s
        self._closers: list[Close] = []

    def on_close(self, close: Close) -> None:
        """Close a resource once every part and tick has stopped (or at ``close()``)."""
        self._closers.append(close)

    async def close(self) -> None:
        """Run the closers, last registered first, each even if an earlier one failed.
        Also for a start that failed before ``run``."""
        while self._closers:
            close = self._closers.pop()
            try:
                await close()
            except Exception as exc:  # stopping goes on
                _log_failure("a component did not close cleanly", exc, logging.WARNING)

    async def run(self, parts: Sequence[Part], ticks: Sequence[Tick], stop: asyncio.Event) -> None:
        """Run until ``stop`` is set or a part fails; then stop everything, set ``stop``,
        and re-raise the failure (so that ``broker serve`` exits non-zero)."""
        started: list[tuple[Part, asyncio.Event, asyncio.Task[None]]] = []
        scheduler: Any = None
        failure: BaseException | None = None
        try:
            for part in parts:
                part_stop = asyncio.Event()
                task = asyncio.create_task(part.run(part_stop), name=f"part:{part.name}")
                started.append((part, part_stop, task))
            scheduler = AsyncIOScheduler(timezone=UTC)
            for tick in ticks:
                tick.attach(scheduler)
            scheduler.start()
            if failed := await _first_failure(started, stop):
                part, failure = failed
                _log_failure("part failed; stopping", failure, logging.ERROR, part=part.name)
        finally:
            stop.set()
            if scheduler is not None:
                await self._stop_ticks(scheduler, ticks)
            for part, part_stop, task in reversed(started):
                await self._stop_part(part, part_stop, task, failure)
            await self.close()
        if failure is not None:
            raise failure

    async def _stop_ticks(self, scheduler: Any, ticks: Sequence[Tick]) -> None:
        if scheduler.running:
            scheduler.pause()
        for tick in ticks:
            tick.detach()
        running = [tick for tick in ticks if tick.running]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(tick.idle() for tick in running)), self._tick_stop_s
            )
        if late := [tick.name for tick in running if tick.running]:
            log.warning("ticks did not finish in time; cancelled", extra={"ticks": late})
        if scheduler.running:
            scheduler.shutdown(wait=False)  # cancels the ticks still running
        if late:
            # Let a cancelled run finish its clean-up (a revocation pass takes back the
            # stamps of what it never sent) before the store and Vault clients close.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(tick.idle() for tick in running)), CANCELLED_TICK_S
                )

    async def _stop_part(
        self, part: Part, stop: asyncio.Event, task: asyncio.Task[None], failure: object
    ) -> None:
        stop.set()
        done, _ = await asyncio.wait({task}, timeout=part.stop_s)
        if not done:
            log.warning("part did not stop in time; cancelled", extra={"part": part.name})
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        elif not task.cancelled() and (exc := task.exception()) not in (None, failure):
            _log_failure("part failed while stopping", exc, logging.ERROR, part=part.name)


async def _first_failure(
    started: Sequence[tuple[Part, asyncio.Event, asyncio.Task[None]]], stop: asyncio.Event
) -> tuple[Part, BaseException] | None:
    """Wait for ``stop`` (None) or a part that raises. A part that returns unasked has
    finished its work (a part that must not, a termination source, is ``Restarting``,
    which turns such a return into a failure); the others carry on."""
    part_of = {task: part for part, _, task in started}
    stopped = asyncio.create_task(stop.wait())
    waiting: set[asyncio.Task[Any]] = {stopped, *part_of}
    try:
        while True:
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopped and not task.cancelled() and (exc := task.exception()):
                    return part_of[task], exc
            if stopped in done:
                return None
    finally:
        stopped.cancel()
