"""The ticks' ``run_once``: revocation drains the due jobs; maintenance runs every step
even when one fails."""

from __future__ import annotations

from typing import Any

from broker.app.ticks import Maintenance, Revocation


class Worker:
    def __init__(self, batches: list[int]) -> None:
        self.batches = batches
        self.calls: list[str] = []

    async def drain(self) -> int:
        self.calls.append("drain")
        return sum(self.batches)

    async def sweep_superseded(self) -> int:
        self.calls.append("sweep")
        return 0


async def test_revocation_drains_the_worker_once_per_run() -> None:
    worker = Worker([16, 3])
    await Revocation(worker).run_once()  # type: ignore[arg-type]
    assert worker.calls == ["drain"]


async def test_a_failing_maintenance_step_does_not_skip_the_others() -> None:
    done: list[str] = []

    class Stub:
        caches: list[Any] = []

        async def maintain_login(self) -> None:
            raise RuntimeError("vault down")

        def prune(self) -> int:
            done.append("tokens")
            return 0

        async def prune_seen_tokens(self, *, grace: object) -> int:
            done.append("replay")
            return 0

    stub, worker = Stub(), Worker([])
    await Maintenance(stub, stub, stub, worker, stub).run_once()  # type: ignore[arg-type]
    assert done == ["tokens", "replay"] and worker.calls == ["sweep"]
