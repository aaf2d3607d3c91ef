"""``RevocationWorker.drain``: up to ``batch`` jobs at once, a slot a finished job frees
filled by a new claim while the others still run, until no job is due."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from broker.errors import StoreUnavailable
from broker.leases import JobView
from broker.leases.ending import LeaseEnder
from broker.revocation.settings import RevocationSettings
from broker.revocation.worker import RevocationWorker
from tests.harness.wait import eventually

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def _job(n: int) -> JobView:
    return JobView(f"j-{n}", f"i-{n}", "running", 1, NOW, None, "admin", NOW, None)


class Queue:
    """Due jobs, claimed in order; remembers each claim's limit."""

    def __init__(self, count: int) -> None:
        self.due = [_job(n) for n in range(count)]
        self.limits: list[int] = []

    async def claim_jobs(self, *, worker: str, limit: int, claim_for: object) -> list[JobView]:
        self.limits.append(limit)
        claimed, self.due = self.due[:limit], self.due[limit:]
        return claimed


def _worker(queue: Queue, batch: int = 8, **settings: Any) -> RevocationWorker:
    worker = RevocationWorker(
        RevocationSettings(batch=batch, **settings),
        queue,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        ender=LeaseEnder(None, None, None),  # type: ignore[arg-type]
    )
    return worker


def _held(worker: RevocationWorker, *, failing: str | None = None):  # type: ignore[no-untyped-def]
    """Jobs that run until ``release`` is set, then land in ``finished``; ``failing``: the
    id of one that fails at once, in a way no job should."""
    release = asyncio.Event()
    finished: list[str] = []

    async def process(job: JobView) -> None:
        if job.job_id == failing:
            raise RuntimeError("a bug in one job")
        await release.wait()
        finished.append(job.job_id)

    worker._process = process  # type: ignore[method-assign]
    return release, finished


async def test_a_slow_job_does_not_hold_back_the_jobs_behind_it() -> None:
    queue = Queue(9)
    worker = _worker(queue, batch=4)
    slow_done = asyncio.Event()
    finished: list[str] = []

    async def process(job: JobView) -> None:
        if job.job_id == "j-0":
            await slow_done.wait()
        finished.append(job.job_id)

    worker._process = process  # type: ignore[method-assign]
    draining = asyncio.create_task(worker.drain())
    # Every other job finishes while j-0 still runs, three slots at a time.
    await eventually(lambda: len(finished) == 8, "the eight quick jobs finished")
    assert "j-0" not in finished and not draining.done()
    slow_done.set()
    assert await asyncio.wait_for(draining, 10) == 9
    assert finished[-1] == "j-0"
    # The first claim fills the batch; later ones wait for a quarter of it to be free.
    assert queue.limits[0] == 4 and all(limit >= 1 for limit in queue.limits)


async def test_nothing_due_claims_once_and_returns() -> None:
    queue = Queue(0)
    assert await _worker(queue, batch=8).drain() == 0
    assert queue.limits == [8]


async def test_one_job_failing_unexpectedly_does_not_stop_the_others(caplog) -> None:
    queue = Queue(6)
    worker = _worker(queue, batch=3)
    release, finished = _held(worker, failing="j-1")
    draining = asyncio.create_task(worker.drain())
    await eventually(lambda: "task failed" in caplog.text, "the failure is logged")
    release.set()
    assert await asyncio.wait_for(draining, 10) == 6
    assert sorted(finished) == ["j-0", "j-2", "j-3", "j-4", "j-5"]


async def test_a_job_claimed_again_while_it_runs_is_not_run_twice() -> None:
    queue = Queue(2)
    worker = _worker(queue, batch=4)
    runs: list[str] = []
    release = asyncio.Event()

    async def process(job: JobView) -> None:
        runs.append(job.job_id)
        if job.job_id == "j-0":
            queue.due.append(job)  # our claim lapsed: the claim returns it again
            await release.wait()

    worker._process = process  # type: ignore[method-assign]
    draining = asyncio.create_task(worker.drain())
    await eventually(lambda: len(queue.limits) >= 2 and not queue.due, "claimed again")
    release.set()
    await asyncio.wait_for(draining, 10)
    assert runs == ["j-0", "j-1"]


async def test_stopping_claims_no_more_and_lets_the_running_jobs_end() -> None:
    queue = Queue(10)
    worker = _worker(queue, batch=2)
    release, finished = _held(worker)
    draining = asyncio.create_task(worker.drain())
    await eventually(lambda: queue.limits == [2], "the first claim")
    worker.stop_claiming()
    release.set()
    assert await asyncio.wait_for(draining, 10) == 2
    assert sorted(finished) == ["j-0", "j-1"] and len(queue.due) == 8


async def test_the_store_failing_a_claim_lets_the_running_jobs_end() -> None:
    queue = Queue(4)
    worker = _worker(queue, batch=4)
    claims = 0
    real_claim = queue.claim_jobs

    async def claim_jobs(**kw: Any) -> list[JobView]:
        nonlocal claims
        claims += 1
        if claims > 1:
            raise StoreUnavailable("the lease store is unavailable")
        return await real_claim(**kw)

    queue.claim_jobs = claim_jobs  # type: ignore[method-assign]
    release, finished = _held(worker)
    queue.due.extend([_job(10), _job(11)])  # due, but the store fails the next claim
    draining = asyncio.create_task(worker.drain())
    await eventually(lambda: claims == 1, "the first claim")
    release.set()
    assert await asyncio.wait_for(draining, 10) == 4
    assert sorted(finished) == ["j-0", "j-1", "j-2", "j-3"]


async def test_a_claim_lost_to_another_worker_stops_the_pass() -> None:
    class Lost(Queue):
        async def extend_claim(self, job: JobView, **kw: Any) -> bool:
            return False  # another worker holds the job now

    queue = Lost(1)
    worker = _worker(queue, claim_timeout_s=5)
    stopped = asyncio.Event()

    async def until_halted(job: JobView, *, halt: Any) -> None:
        await eventually(halt, "the pass is told to end at its next safe point")
        stopped.set()

    worker._process_claimed = until_halted  # type: ignore[method-assign]
    assert await asyncio.wait_for(worker.drain(), 30) == 1
    assert stopped.is_set()
