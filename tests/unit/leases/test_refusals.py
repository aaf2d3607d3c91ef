"""Refusals into the audit, bounded: the first of a kind per window at once, repeats as
one counted event when the window closes, and a cap on the kinds tracked."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from broker.clock import FixedClock
from broker.errors import StoreUnavailable
from broker.leases.refusals import MAX_FINGERPRINTS, BoundedRefusals

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


async def test_junk_tokens_neither_make_kinds_nor_push_out_who_was_refused() -> None:
    """Review finding 4 (PoC poc_overflow): 1000 random bearer tokens from one source used
    to fill max_kinds, and the next operator's refusal was written as ('unknown', overflow),
    its name, route and scope gone. Unauthenticated refusals are one kind per (route, code,
    source), counting distinct fingerprints; an operator's refusal is its own kind."""
    ledger, clock = Ledger(), FixedClock(T0)
    refusals = BoundedRefusals(ledger, clock, window_s=60, max_kinds=1000)
    for i in range(1000):
        await refusals.refused("unknown", "admin.refused", reason="admin_forbidden",
                               method="POST", route="/v1/admin/locks", scope="revoke",
                               source="10.0.0.66", token_fingerprint=f"fp:{i:012x}")
    assert ledger.events == [{
        "actor": "unknown", "action": "admin.refused", "outcome": "refused",
        "reason": "admin_forbidden", "count": 1, "method": "POST", "route": "/v1/admin/locks",
        "scope": "revoke", "source": "10.0.0.66", "token_fingerprint": "fp:000000000000"}]
    await refusals.refused("operator:injector", "admin.refused",
                           reason="operator_scope_insufficient", method="DELETE",
                           route="/v1/admin/locks/{lock_id}", scope="revoke",
                           source="10.0.0.66")
    assert ledger.events[1] == {
        "actor": "operator:injector", "action": "admin.refused", "outcome": "refused",
        "reason": "operator_scope_insufficient", "count": 1, "method": "DELETE",
        "route": "/v1/admin/locks/{lock_id}", "scope": "revoke", "source": "10.0.0.66"}
    clock.advance(60)
    assert await refusals.flush() == 1
    assert ledger.events[2] == {
        "actor": "unknown", "action": "admin.refused", "outcome": "refused",
        "reason": "admin_forbidden", "count": 999, "method": "POST",
        "route": "/v1/admin/locks", "scope": "revoke", "source": "10.0.0.66",
        "distinct_fingerprints": 1000,
        "since": "2026-03-01T12:00:00Z", "until": "2026-03-01T12:01:00Z"}


async def test_unauthenticated_sources_cannot_overflow_the_named_callers() -> None:
    """Many sources overflow the unauthenticated kinds; operators and workloads keep theirs
    (a separate cap), and beyond that cap still keep their name."""
    ledger, clock = Ledger(), FixedClock(T0)
    refusals = BoundedRefusals(ledger, clock, max_kinds=2, max_named_kinds=2)
    for source in ("a", "b", "c", "d"):
        await refusals.refused("unknown", "admin.refused", source=source,
                               token_fingerprint="fp:" + source)
    for route in ("/r1", "/r2", "/r3", "/r4"):
        await refusals.refused("operator:alice", "admin.refused", route=route)
    assert [(e["actor"], e.get("source") or e.get("route") or e.get("overflow"))
            for e in ledger.events] == [
        ("unknown", "a"), ("unknown", "b"), ("unknown", "true"),
        ("operator:alice", "/r1"), ("operator:alice", "/r2"), ("operator:alice", "true")]
    assert ledger.events[0]["token_fingerprint"] == "fp:a"
    assert await refusals.flush_all() == 2
    assert {(e["actor"], e["count"], e.get("distinct_fingerprints")) for e in ledger.events[6:]} \
        == {("unknown", 1, 2), ("operator:alice", 1, None)}


async def test_distinct_fingerprints_are_counted_up_to_a_bound() -> None:
    ledger, clock = Ledger(), FixedClock(T0)
    refusals = BoundedRefusals(ledger, clock)
    for i in range(MAX_FINGERPRINTS + 50):
        await refusals.refused("unknown", "admin.refused", source="a",
                               token_fingerprint=f"fp:{i}")
    await refusals.flush_all()
    assert ledger.events[-1]["count"] == MAX_FINGERPRINTS + 49
    assert ledger.events[-1]["distinct_fingerprints"] == MAX_FINGERPRINTS
