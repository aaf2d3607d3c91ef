"""The one terminate path: the durable job first, then the token forgotten and the
revocation tick woken while there is work to do."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from broker.errors import StoreUnavailable
from broker.leases import JobState, JobView, Termination
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
                                  issuer: str | None = None, workload: str | None = None,
                                  token_id: tuple[str, datetime] | None = None,
                                  reason: str | None = None,
                                  incident: str | None = None,
                                  self_terminated: bool = False) -> Termination:
        self.calls.append(f"job {instance_id} {actor} {issuer}")
        if self_terminated:
            self.calls.append("self")
        if (workload, token_id, reason) != (None, None, None):
            self.calls.append(f"as {workload} {token_id} {reason}")
        if incident is not None:
            self.calls.append(f"incident {incident}")
        if self._fail:
            raise StoreUnavailable("the lease store is unavailable")
        return Termination(job(self._state), never_seen=instance_id == "i-typo")

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


async def test_an_instance_ending_itself_hands_its_workload_token_id_and_reason_to_the_ledger(
) -> None:
    rec = Recorder()
    await Terminator(rec, rec, rec.wake)("i-1", actor="workload:k8s", issuer="k8s",
                                         workload="ns/sa", token_id=("jti-1", NOW),
                                         reason="pod stopping", self_terminated=True)
    assert rec.calls == ["job i-1 workload:k8s k8s", "self",
                         f"as ns/sa ('jti-1', {NOW!r}) pod stopping", "forget i-1", "wake"]


async def test_an_operator_s_reason_and_incident_reach_the_ledger() -> None:
    rec = Recorder()
    await Terminator(rec, rec, rec.wake)("i-1", actor="operator:alice", reason="stolen",
                                         incident="INC-7")
    assert rec.calls == ["job i-1 operator:alice None", "as None None stolen", "incident INC-7",
                         "forget i-1", "wake"]


@pytest.mark.parametrize(("instance", "never_seen"), [("i-1", False), ("i-typo", True)])
async def test_an_operators_termination_is_answered_with_whether_the_id_was_ever_seen(
        instance: str, never_seen: bool) -> None:
    rec = Recorder()
    answer = await Terminator(rec, rec, rec.wake).request(instance, actor="operator:alice")
    assert (answer.job.state, answer.never_seen) == (JobState.PENDING, never_seen)
    assert rec.calls == [f"job {instance} operator:alice None", f"forget {instance}", "wake"]
