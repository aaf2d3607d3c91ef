"""The bulk termination's guard (pure) and its service: engines added to the blast
radius, tokens forgotten and the worker woken after a batch that terminated something."""

from __future__ import annotations

import pytest

from broker.errors import BadRequest, SelectionTooLarge
from broker.leases import BlastRadius, Progress, Selection, Terminated, TerminationBatch
from broker.revocation.bulk import BulkTerminator, guard


@pytest.mark.parametrize("reach,reason,max_,refusal", [
    (0, None, None, None), (1, None, None, None), (2, "why", None, None),
    (2, None, None, "reason_required"), (2, "", None, "reason_required"),
    (5, "why", 5, None), (6, "why", 5, "selection_too_large"),
    (6, None, 5, "selection_too_large"), (1, None, 1, None),
], ids=["none", "one_needs_no_reason", "bulk_with_reason", "bulk_without_reason",
        "empty_reason", "at_max", "over_max", "over_max_first", "one_at_max_one"])
def test_guard(reach, reason, max_, refusal):
    if refusal is None:
        guard(reach, reason=reason, max_instances=max_)
        return
    with pytest.raises((BadRequest, SelectionTooLarge)) as info:
        guard(reach, reason=reason, max_instances=max_)
    assert info.value.code == refusal


class Ledger:
    def __init__(self, batch: TerminationBatch) -> None:
        self.batch = batch
        self.checked: list[int] = []

    async def blast_radius(self, chosen, *, top, sample):
        return BlastRadius(
            instances=2, already_terminated=0, live_leases=3, leases_by_role={"db": 2, "x": 1},
            leases_by_kind={}, workloads=(), workload_count=0, issuers={}, never_seen=(),
            sample=(), progress=Progress())

    async def terminate_next(self, chosen, *, after, limit, actor, reason, incident, check):
        check(2)
        return self.batch


class Tokens:
    def __init__(self) -> None:
        self.forgotten: list[str] = []

    def forget(self, instance_id: str) -> None:
        self.forgotten.append(instance_id)


async def test_engines_come_from_the_roles():
    bulk = BulkTerminator(Ledger(TerminationBatch((), (), None, 0)), Tokens(), lambda: None,
                          {"db": "database"})
    radius = await bulk.blast_radius(Selection(workloads=("w",)))
    assert radius.leases_by_engine == {"-": 1, "database": 2}


async def test_a_batch_forgets_tokens_and_wakes_the_worker_once():
    woken: list[int] = []
    tokens = Tokens()
    batch = TerminationBatch((Terminated("a", "j-a", 1), Terminated("b", "j-b", 0)), (), None, 2)
    bulk = BulkTerminator(Ledger(batch), tokens, lambda: woken.append(1), {})
    out = await bulk.terminate(Selection(workloads=("w",)), after=None, batch=10,
                               max_instances=None, actor="operator:x", reason="r", incident=None)
    assert out is batch and tokens.forgotten == ["a", "b"] and woken == [1]
    with pytest.raises(BadRequest):  # the guard runs inside the ledger's transaction
        await bulk.terminate(Selection(workloads=("w",)), after=None, batch=10,
                             max_instances=None, actor="operator:x", reason=None, incident=None)


async def test_nothing_terminated_wakes_nothing():
    woken: list[int] = []
    bulk = BulkTerminator(Ledger(TerminationBatch((), (), None, 0)), Tokens(),
                          lambda: woken.append(1), {})
    await bulk.terminate(Selection(workloads=("w",)), after=None, batch=10, max_instances=None,
                         actor="operator:x", reason="r", incident=None)
    assert woken == []
