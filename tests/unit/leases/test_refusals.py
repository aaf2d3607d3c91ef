"""Refusals into the audit, bounded: the first of a kind per window at once, repeats as
one counted event when the window closes, and a cap on the kinds tracked."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from broker.clock import FixedClock
from broker.errors import StoreUnavailable
from broker.leases.refusals import BoundedRefusals

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)


class Ledger:
    def __init__(self, fail: bool = False) -> None:
        self.events: list[dict[str, Any]] = []
        self.fail = fail

    async def record_audit(self, actor: str, action: str, **detail: Any) -> None:
        if self.fail:
            raise StoreUnavailable("down")
        self.events.append({"actor": actor, "action": action, **detail})


async def test_the_first_refusal_is_written_at_once_and_repeats_once_counted() -> None:
    ledger, clock = Ledger(), FixedClock(T0)
    refusals = BoundedRefusals(ledger, clock, window_s=60)
    for _ in range(500):
        await refusals.refused("unknown", "admin.refused", reason="admin_forbidden",
                               source="10.0.0.1")
    assert ledger.events == [{"actor": "unknown", "action": "admin.refused",
                              "outcome": "refused", "reason": "admin_forbidden", "count": 1,
                              "source": "10.0.0.1"}]
    assert await refusals.flush() == 0  # the window is still open
    clock.advance(60)
    assert await refusals.flush() == 1
    assert ledger.events[1] == {"actor": "unknown", "action": "admin.refused",
                                "outcome": "refused", "reason": "admin_forbidden",
                                "count": 499, "source": "10.0.0.1",
                                "since": "2026-03-01T12:00:00Z", "until": "2026-03-01T12:01:00Z"}
    assert await refusals.flush() == 0


async def test_each_kind_and_source_is_its_own_first() -> None:
    ledger, clock = Ledger(), FixedClock(T0)
    refusals = BoundedRefusals(ledger, clock)
    await refusals.refused("unknown", "admin.refused", source="a")
    await refusals.refused("unknown", "admin.refused", source="b")
    await refusals.refused("operator:x", "admin.refused", source="a")
    await refusals.refused("unknown", "admin.refused", source="a")
    assert [(e["actor"], e["source"], e["count"]) for e in ledger.events] == [
        ("unknown", "a", 1), ("unknown", "b", 1), ("operator:x", "a", 1)]


async def test_a_refusal_after_the_window_writes_the_last_window_s_repeats_first() -> None:
    ledger, clock = Ledger(), FixedClock(T0)
    refusals = BoundedRefusals(ledger, clock, window_s=60)
    for _ in range(3):
        await refusals.refused("unknown", "admin.refused", source="a")
    clock.advance(61)
    await refusals.refused("unknown", "admin.refused", source="a")
    assert [e["count"] for e in ledger.events] == [1, 2, 1]


async def test_kinds_are_capped_per_window() -> None:
    ledger, clock = Ledger(), FixedClock(T0)
    refusals = BoundedRefusals(ledger, clock, max_kinds=2)
    for source in ("a", "b", "c", "d", "e"):
        await refusals.refused("unknown", "admin.refused", source=source)
    assert [e.get("source", e.get("overflow")) for e in ledger.events] == ["a", "b", "true"]
    assert await refusals.flush_all() == 1
    assert ledger.events[-1]["count"] == 2 and ledger.events[-1]["overflow"] == "true"


async def test_a_store_that_fails_drops_the_event_and_refuses_all_the_same() -> None:
    refusals = BoundedRefusals(Ledger(fail=True), FixedClock(T0))
    await refusals.refused("unknown", "admin.refused", source="a")  # no exception
