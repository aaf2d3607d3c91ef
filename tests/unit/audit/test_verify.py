"""The pure chain verifier: every way of tampering is named, with its seq, and an
untouched chain of any length verifies in any page size."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.audit.verify import (
    ALTERED,
    BAD_SIGNATURE,
    BROKEN_LINK,
    CHECKPOINT_MISMATCH,
    GAP,
    HEAD_MISMATCH,
    MOVED,
    OUT_OF_ORDER,
    REORDERED,
    TRUNCATED,
    Verifier,
    verify,
)
from broker.leases import chain
from broker.leases.views import AuditEventView, CheckpointView

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def make_chain(n: int, *, start: int = 1, prev: str = chain.GENESIS) -> list[AuditEventView]:
    out = []
    for seq in range(start, start + n):
        at = T0 + timedelta(seconds=seq)
        fields = dict(
            actor="workload" if seq % 2 else "operator:alice",
            action="lease.issued" if seq % 3 else "lease.renewed",
            instance_id=f"i-{seq % 5}",
            lease_id=f"l-{seq}",
            outcome="ok",
            reason=None if seq % 4 else "incident 7",
            detail={"role": "db", "n": seq, "ids": [f"l-{seq}"]},
        )
        digest = chain.link_hash(prev, chain.event_document(seq=seq, at=at, **fields))
        out.append(AuditEventView(row_id=seq, seq=seq, at=at, prev_hash=prev, hash=digest,
                                  **fields))
        prev = digest
    return out


def checkpoint(event: AuditEventView, source: str = "store") -> CheckpointView:
    return CheckpointView(event.seq, event.hash, event.at, "file", "k1", "sig", source)


def kinds(report) -> list[tuple[str, int]]:
    return [(f.kind, f.seq) for f in report.findings]


def test_an_untouched_chain_verifies():
    events = make_chain(20)
    report = verify(events, [checkpoint(events[9])], head=(20, events[-1].hash))
    assert report.ok and report.first_bad_seq is None
    assert (report.events, report.last_seq, report.last_checkpoint_seq) == (20, 20, 10)
    assert report.after_last_checkpoint == 10
    assert not report.signatures_checked
    doc = report.to_dict()
    assert doc["ok"] is True and doc["findings"] == []
    assert any("signatures not checked" in n for n in doc["notices"])


def test_an_empty_chain_verifies():
    report = verify([], head=(0, chain.GENESIS))
    assert report.ok and report.events == 0 and report.last_seq is None


@pytest.mark.parametrize("field,value", [
    ("actor", "operator:mallory"), ("action", "lease.released"), ("instance_id", "i-x"),
    ("lease_id", None), ("outcome", "refused"), ("reason", "nothing to see"),
    ("detail", {"role": "admin"}), ("at", T0),
], ids=lambda v: str(v)[:20])
def test_a_changed_field_is_named_altered_at_its_seq(field, value):
    events = make_chain(10)
    events[4] = replace(events[4], **{field: value})
    report = verify(events)
    assert kinds(report) == [(ALTERED, 5)]
    assert report.first_bad_seq == 5


def test_a_replaced_event_with_a_recomputed_hash_breaks_the_next_link():
    events = make_chain(10)
    forged = make_chain(1, start=5, prev=events[3].hash)[0]
    forged = replace(forged, actor="someone else")
    doc = chain.event_document(seq=5, at=forged.at, actor=forged.actor, action=forged.action,
                               instance_id=forged.instance_id, lease_id=forged.lease_id,
                               outcome=forged.outcome, reason=forged.reason,
                               detail=forged.detail)
    events[4] = replace(forged, hash=chain.link_hash(events[3].hash, doc))
    assert kinds(verify(events)) == [(BROKEN_LINK, 6)]


def test_a_deleted_event_is_a_gap():
    events = make_chain(10)
    del events[4]
    report = verify(events)
    assert kinds(report) == [(GAP, 5)]
    assert "seq 5 missing" in report.findings[0].message


def test_several_deleted_events_are_one_gap():
    events = make_chain(10)
    del events[3:6]
    assert kinds(verify(events)) == [(GAP, 4)]


def test_a_deleted_tail_is_truncated_by_the_checkpoint_past_the_end():
    events = make_chain(10)
    cp = checkpoint(events[7], source="external")
    report = verify(events[:6], [cp])
    assert kinds(report) == [(TRUNCATED, 7)]
    assert "seq 8 (external)" in report.findings[0].message


def test_a_deleted_tail_is_truncated_by_the_head_row():
    events = make_chain(10)
    assert kinds(verify(events[:6], head=(10, events[-1].hash))) == [(TRUNCATED, 7)]


def test_a_head_that_disagrees_with_the_last_event():
    events = make_chain(3)
    assert kinds(verify(events, head=(3, "f" * 64))) == [(HEAD_MISMATCH, 3)]


def test_two_events_with_swapped_contents_are_named_moved():
    events = make_chain(10)
    a, b = events[4], events[6]
    events[4] = replace(b, row_id=a.row_id, seq=a.seq)
    events[6] = replace(a, row_id=b.row_id, seq=b.seq)
    report = verify(events)
    assert (MOVED, 5) in kinds(report) and (MOVED, 7) in kinds(report)
    assert ALTERED not in {k for k, _ in kinds(report)}
    assert "holds the event of seq 7" in next(f.message for f in report.findings if f.seq == 5)


def test_two_rows_with_swapped_seqs_are_named_reordered_and_moved():
    events = make_chain(10)
    a, b = events[4], events[6]
    # The rows keep their contents and insertion order; only their seqs were swapped.
    events[4] = replace(b, seq=a.seq)
    events[6] = replace(a, seq=b.seq)
    found = kinds(verify(events))
    assert (MOVED, 5) in found and (MOVED, 7) in found
    assert (REORDERED, 6) in found


def test_events_fed_out_of_order():
    events = make_chain(5)
    assert (OUT_OF_ORDER, 2) in kinds(verify([events[0], events[2], events[1]]))


def test_a_checkpoint_that_disagrees_with_the_event():
    events = make_chain(5)
    cp = replace(checkpoint(events[2]), hash="a" * 64)
    assert kinds(verify(events, [cp])) == [(CHECKPOINT_MISMATCH, 3)]


def test_signatures_go_through_the_injected_check():
    events = make_chain(5)
    good, bad = checkpoint(events[1]), replace(checkpoint(events[3]), signature="forged")
    report = verify(events, [good, bad], check_signature=lambda cp: cp.signature == "sig")
    assert report.signatures_checked
    assert kinds(report) == [(BAD_SIGNATURE, 4)]


def test_verifying_from_a_seq_starts_at_the_anchor():
    events = make_chain(10)
    report = verify(events[5:], from_seq=6, anchor=(5, events[4].hash))
    assert report.ok and report.events == 5 and report.from_seq == 6
    assert kinds(verify(events[5:], from_seq=6, anchor=(5, "0" * 64))) == [(BROKEN_LINK, 6)]


def test_checkpoints_before_the_start_are_not_compared():
    events = make_chain(10)
    bad = replace(checkpoint(events[1]), hash="b" * 64)
    assert verify(events[5:], [bad], from_seq=6, anchor=(5, events[4].hash)).ok


def test_findings_are_bounded():
    events = [replace(e, actor="x") for e in make_chain(300)]
    report = verify(events)
    assert len(report.findings) == 200 and report.findings_omitted == 100


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 60), page=st.integers(1, 17))
def test_any_untouched_chain_verifies_in_any_page_size(n, page):
    events = make_chain(n)
    verifier = Verifier(checkpoints=[checkpoint(e) for e in events[::7]])
    for i in range(0, n, page):
        verifier.feed(events[i:i + page])
    assert verifier.finish().ok


@settings(max_examples=80, deadline=None)
@given(n=st.integers(2, 40), data=st.data())
def test_any_single_tampering_is_found_at_or_before_its_seq(n, data):
    events = make_chain(n)
    i = data.draw(st.integers(0, n - 1))
    how = data.draw(st.sampled_from(["edit", "delete", "truncate"]))
    cps = [checkpoint(events[-1])]
    if how == "edit":
        events[i] = replace(events[i], detail={"tampered": True})
    elif how == "delete":
        if i == n - 1:
            return  # the tail: the "truncate" case
        del events[i]
    else:
        events = events[:i]
    report = verify(events, cps)
    assert not report.ok
    assert report.first_bad_seq == i + 1
