"""The one terminate path: the durable job first, then the token forgotten and the
revocation tick woken while there is work to do."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from broker.errors import StoreUnavailable
from broker.leases import JobState, JobView
from broker.revocation.terminator import Terminator

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def job(state: str) -> JobView:
    return JobView(job_id="j-1", instance_id="i-1", state=state, attempts=0,
                   next_attempt_at=NOW, last_error=None, requested_by="admin",
                   created_at=NOW, completed_at=None)


class Recorder:
    def __init__(self, state: str = JobState.PENDING, fail: bool = False) -> None:
        self.calls: list[str] = []
        self._state = state
        self._fail = fail

    async def request_termination(self, instance_id: str, *, actor: str,
                                  issuer: str | None = None) -> JobView:
        self.calls.append(f"job {instance_id} {actor} {issuer}")
        if self._fail:
            raise StoreUnavailable("the lease store is unavailable")
        return job(self._state)

    def forget(self, instance_id: str) -> None:
        self.calls.append(f"forget {instance_id}")

    def wake(self) -> None:
        self.calls.append("wake")


@pytest.mark.parametrize("state", [JobState.PENDING, JobState.RUNNING])
async def test_a_job_to_do_is_recorded_then_the_token_forgotten_then_the_tick_woken(
        state: str) -> None:
    rec = Recorder(state)
    answer = await Terminator(rec, rec, rec.wake)("i-1", actor="events:sqs", issuer="aws")
    assert answer.state == state
    assert rec.calls == ["job i-1 events:sqs aws", "forget i-1", "wake"]


@pytest.mark.parametrize("state", [JobState.DONE, JobState.FAILED])
async def test_a_settled_job_forgets_the_token_but_wakes_nothing(state: str) -> None:
    rec = Recorder(state)
    await Terminator(rec, rec, rec.wake)("i-1", actor="admin")
    assert rec.calls == ["job i-1 admin None", "forget i-1"]


async def test_when_the_job_cannot_be_recorded_nothing_else_happens() -> None:
    rec = Recorder(fail=True)
    with pytest.raises(StoreUnavailable):
        await Terminator(rec, rec, rec.wake)("i-1", actor="admin")
    assert rec.calls == ["job i-1 admin None"]
