"""The supervisor without a server: parts, ticks, restarts and closers, with injected time.

Tests wait for the condition they need (an event, a queue) with a generous bound, never
for a deadline: a busy machine makes them slower, not red.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from broker.app.supervisor import Backoff, Close, Restarting, Supervisor, Tick
from broker.errors import StoreUnavailable
from tests.harness.wait import eventually

WAIT_S = 30.0  # only ever reached when a test is broken
HOUR = 3600.0  # a tick interval that never elapses during a test


async def until(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), WAIT_S)


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def closer(self, name: str, fail: bool = False) -> Close:
        async def close() -> None:
            self.events.append(f"close {name}")
            if fail:
                raise RuntimeError("close failed")

        return close


class WaitingPart:
    """Works until asked to stop; records its start and stop."""

    stop_s = WAIT_S

    def __init__(self, name: str, rec: Recorder) -> None:
        self.name = name
        self.rec = rec
        self.started = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        self.rec.events.append(f"start {self.name}")
        self.started.set()
        await stop.wait()
        self.rec.events.append(f"stop {self.name}")


class FailingPart:
    """Raises once ``go`` is set."""

    stop_s = WAIT_S

    def __init__(self, name: str) -> None:
        self.name = name
        self.go = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        await self.go.wait()
        raise RuntimeError("source broke")


class FakeTime:
    """The clock and the pauses ``Restarting`` sees, and the restarts it counts."""

    def __init__(self) -> None:
        self.now = 0.0
        self.delays: list[float] = []
        self.restarts: list[str] = []

    async def pause(self, seconds: float, stop: asyncio.Event) -> None:
        self.delays.append(seconds)

    def restarting(self, part: FlakyPart, give_up_after: int) -> Restarting:
        return Restarting(
            part,
            Backoff(give_up_after=give_up_after),
            on_restart=self.restarts.append,
            now=lambda: self.now,
            pause=self.pause,
        )


class FlakyPart:
    """Each run lasts the next of ``durations`` on the fake clock, then raises; once they
    are used up, it works until stopped."""

    def __init__(self, durations: list[float], time: FakeTime) -> None:
        self.name = "flaky"
        self.durations = list(durations)
        self.time = time
        self.runs = 0
        self.healthy = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        self.runs += 1
        if self.durations:
            self.time.now += self.durations.pop(0)
            raise RuntimeError("watch session broke")
        self.healthy.set()
        await stop.wait()


async def test_first_fatal_failure_stops_every_part_and_is_raised() -> None:
    rec, stop = Recorder(), asyncio.Event()
    a, c = WaitingPart("a", rec), WaitingPart("c", rec)
    boom = FailingPart("boom")
    sup = Supervisor()
    sup.on_close(rec.closer("store"))
    run = asyncio.create_task(sup.run([a, boom, c], [], stop))
    await until(a.started)
    await until(c.started)
    boom.go.set()
    with pytest.raises(RuntimeError, match="source broke"):
        await asyncio.wait_for(run, WAIT_S)
    assert stop.is_set()
    assert rec.events == ["start a", "start c", "stop c", "stop a", "close store"]


async def test_stop_from_outside_stops_parts_in_reverse_then_closers_in_reverse() -> None:
    rec, stop = Recorder(), asyncio.Event()
    parts = [WaitingPart(name, rec) for name in ("http", "sqs", "pod-watch")]
    sup = Supervisor()
    for name in ("store", "vault", "http session"):
        sup.on_close(rec.closer(name))
    run = asyncio.create_task(sup.run(parts, [], stop))
    for part in parts:
        await until(part.started)
    stop.set()
    await asyncio.wait_for(run, WAIT_S)
    stops = ["stop pod-watch", "stop sqs", "stop http"]
    assert rec.events[3:] == [*stops, "close http session", "close vault", "close store"]


async def test_closers_run_in_reverse_even_when_one_fails(caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    sup = Supervisor()
    sup.on_close(rec.closer("first"))
    sup.on_close(rec.closer("second", fail=True))
    sup.on_close(rec.closer("third"))
    with caplog.at_level(logging.WARNING, logger="broker.app.supervisor"):
        await sup.close()
        await sup.close()  # closers run once
    assert rec.events == ["close third", "close second", "close first"]
    assert [r.message for r in caplog.records] == ["a component did not close cleanly"]


async def test_a_part_that_ignores_stop_is_cancelled_after_the_bound() -> None:
    cancelled = asyncio.Event()

    class Stubborn:
        name = "stubborn"
        stop_s = 0.01

        async def run(self, stop: asyncio.Event) -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

    stop = asyncio.Event()
    run = asyncio.create_task(Supervisor().run([Stubborn()], [], stop))
    stop.set()
    await asyncio.wait_for(run, WAIT_S)
    assert cancelled.is_set()


async def test_a_failing_part_is_restarted_with_doubling_backoff_then_runs() -> None:
    time = FakeTime()
    part = FlakyPart([0.0] * 8, time)
    stop = asyncio.Event()
    run = asyncio.create_task(time.restarting(part, give_up_after=10).run(stop))
    await until(part.healthy)
    stop.set()
    await asyncio.wait_for(run, WAIT_S)
    assert time.delays == [1, 2, 4, 8, 16, 32, 60, 60]
    assert time.restarts == ["flaky"] * 8
    assert part.runs == 9


async def test_a_healthy_run_starts_the_backoff_again() -> None:
    time = FakeTime()
    part = FlakyPart([5.0, 5.0, 60.0, 5.0], time)  # the third run was healthy
    stop = asyncio.Event()
    run = asyncio.create_task(time.restarting(part, give_up_after=3).run(stop))
    await until(part.healthy)
    stop.set()
    await asyncio.wait_for(run, WAIT_S)
    assert time.delays == [1, 2, 1, 2]


async def test_a_part_that_keeps_failing_quickly_stops_the_broker() -> None:
    rec, stop = Recorder(), asyncio.Event()
    time = FakeTime()
    http = WaitingPart("http", rec)
    flaky = time.restarting(FlakyPart([1.0] * 5, time), give_up_after=3)
    run = asyncio.create_task(Supervisor().run([http, flaky], [], stop))
    with pytest.raises(RuntimeError, match="watch session broke"):
        await asyncio.wait_for(run, WAIT_S)
    assert time.delays == [1, 2]
    assert time.restarts == ["flaky", "flaky"]
    assert rec.events == ["start http", "stop http"]


async def test_a_tick_that_fails_logs_the_error_and_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = [StoreUnavailable("the lease store cannot be reached"), RuntimeError("bug")]
    ran: asyncio.Queue[int] = asyncio.Queue()
    runs = 0

    async def work() -> None:
        nonlocal runs
        runs += 1
        ran.put_nowait(runs)
        if failures:
            raise failures.pop(0)

    tick = Tick("reconcile", HOUR, work, at_start=True)
    stop = asyncio.Event()
    with caplog.at_level(logging.ERROR, logger="broker.app.supervisor"):
        run = asyncio.create_task(Supervisor().run([], [tick], stop))
        assert await asyncio.wait_for(ran.get(), WAIT_S) == 1
        tick.kick()
        assert await asyncio.wait_for(ran.get(), WAIT_S) == 2
        tick.kick()
        assert await asyncio.wait_for(ran.get(), WAIT_S) == 3
        stop.set()
        await asyncio.wait_for(run, WAIT_S)
    failed = [r for r in caplog.records if r.message == "tick failed"]
    logged = [(r.__dict__["tick"], r.__dict__.get("code")) for r in failed]
    assert logged == [("reconcile", "store_unavailable"), ("reconcile", None)]
    assert failed[0].exc_info is None  # a BrokerError says enough by its code and message
    assert failed[1].exc_info is not None  # anything else is a bug: keep its traceback


async def test_kicks_during_a_run_bring_exactly_one_more_run() -> None:
    release = asyncio.Event()
    started: asyncio.Queue[int] = asyncio.Queue()
    runs = 0

    async def work() -> None:
        nonlocal runs
        runs += 1
        started.put_nowait(runs)
        if runs == 1:
            await release.wait()

    tick = Tick("revocation", HOUR, work, at_start=True)
    stop = asyncio.Event()
    run = asyncio.create_task(Supervisor(tick_stop_s=WAIT_S).run([], [tick], stop))
    await asyncio.wait_for(started.get(), WAIT_S)
    for _ in range(3):
        tick.kick()
    release.set()
    assert await asyncio.wait_for(started.get(), WAIT_S) == 2
    stop.set()  # the stop waits for the running tick, so a third run would be seen
    await asyncio.wait_for(run, WAIT_S)
    assert runs == 2


async def test_a_kick_while_idle_runs_the_tick_now() -> None:
    started: asyncio.Queue[int] = asyncio.Queue()

    async def work() -> None:
        started.put_nowait(1)

    tick = Tick("revocation", HOUR, work, at_start=True)
    tick.kick()  # not running yet: nothing happens
    stop = asyncio.Event()
    run = asyncio.create_task(Supervisor().run([], [tick], stop))
    await asyncio.wait_for(started.get(), WAIT_S)  # the run has ended when this returns
    tick.kick()
    await asyncio.wait_for(started.get(), WAIT_S)  # an hour before the interval would
    stop.set()
    await asyncio.wait_for(run, WAIT_S)
    assert started.empty()


async def test_stopping_lets_a_running_tick_finish() -> None:
    release, running, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def work() -> None:
        running.set()
        await release.wait()
        finished.set()

    stop = asyncio.Event()
    tick = Tick("maintenance", HOUR, work, at_start=True)
    run = asyncio.create_task(Supervisor(tick_stop_s=WAIT_S).run([], [tick], stop))
    await until(running)
    stop.set()
    await eventually(lambda: not tick.attached, "the supervisor reached the ticks' stop")
    assert not run.done()
    release.set()
    await asyncio.wait_for(run, WAIT_S)
    assert finished.is_set()


async def test_a_tick_that_outlives_the_stop_bound_is_cancelled() -> None:
    running, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    stop = asyncio.Event()
    tick = Tick("maintenance", HOUR, work, at_start=True)
    run = asyncio.create_task(Supervisor(tick_stop_s=0.01).run([], [tick], stop))
    await until(running)
    stop.set()
    await asyncio.wait_for(run, WAIT_S)
    await until(cancelled)


async def test_a_restarting_part_that_returns_unasked_is_restarted_as_a_failure() -> None:
    time = FakeTime()

    class Quitter:
        """Returns at once twice (as a source whose loop ended quietly), then works."""

        name = "quitter"
        stop_s = WAIT_S

        def __init__(self) -> None:
            self.runs = 0
            self.working = asyncio.Event()

        async def run(self, stop: asyncio.Event) -> None:
            self.runs += 1
            if self.runs <= 2:
                return
            self.working.set()
            await stop.wait()

    part, stop = Quitter(), asyncio.Event()
    run = asyncio.create_task(
        Restarting(part, Backoff(give_up_after=5), on_restart=time.restarts.append,
                   now=lambda: time.now, pause=time.pause).run(stop)
    )
    await until(part.working)
    stop.set()
    await asyncio.wait_for(run, WAIT_S)
    assert (part.runs, time.delays, time.restarts) == (3, [1, 2], ["quitter", "quitter"])


async def test_a_part_gets_its_own_stop_budget_before_it_is_cancelled() -> None:
    """A slow part (the HTTP server draining requests in flight) is given its own
    ``stop_s``, not a budget common to every part: it is still draining well after a quick
    part's budget has passed, and finishes when its drain does."""
    asked, release, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()

    class Quick:
        name = "quick"
        stop_s = 0.01

        async def run(self, stop: asyncio.Event) -> None:
            await stop.wait()

    class Draining:
        name = "draining"
        stop_s = WAIT_S

        async def run(self, stop: asyncio.Event) -> None:
            await stop.wait()
            asked.set()
            await release.wait()  # the drain: requests still in flight
            finished.set()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    run = asyncio.create_task(Supervisor().run([Quick(), Draining()], [], stop))
    stop.set()
    await until(asked)  # parts stop last first: the draining part is asked first
    asked_at = loop.time()
    await eventually(
        lambda: loop.time() >= asked_at + 10 * Quick.stop_s, "ten quick budgets to pass"
    )
    assert not run.done()
    release.set()
    await asyncio.wait_for(run, WAIT_S)
    assert finished.is_set()
