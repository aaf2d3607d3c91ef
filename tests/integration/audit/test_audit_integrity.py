"""Review findings 1, 2 and 3 (the proofs of concept in the review, as regression tests) on
the real store, SQLite and PostgreSQL: someone with write access to the database rewrites
events (consistently: hashes and the head recomputed), forges a checkpoint row, or
deletes the checkpoints. The writer must not sign a rewritten chain nor stall on a forged
row, and verification must not call a chain whose checkpoints were deleted ok."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text

from broker.audit.checkpoint import uncovered_limit
from broker.audit.external import file_checkpoints
from broker.audit.service import AuditVerification
from broker.audit.settings import CheckpointSettings
from broker.audit.signers import FileSigner, Signatures
from broker.audit.verify import UNCOVERED
from broker.audit.writer import CheckpointWriter
from broker.leases import AuditSelection
from broker.leases import chain as ch
from tests.integration.leases.conftest import ledgers  # noqa: F401 — the two-backend fixture

EVERY = 60


async def append(s, n: int, actor: str = "reconciler", action: str = "x") -> None:
    for i in range(n):
        await s.reconcile.record_audit(actor, action, n=i)


async def rewrite(s, *, from_seq: int, forge) -> None:
    """What an attacker with DB write access does: change events from ``from_seq`` on
    (``forge(row) -> actor``), recompute every hash after them and move the head."""
    async with s.database.transaction() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT seq, at, actor, action, instance_id, lease_id, outcome, reason, "
                    "detail, prev_hash FROM audit_events WHERE seq >= :s ORDER BY seq"
                ),
                {"s": from_seq},
            )
        ).all()
        prev = rows[0].prev_hash
        for r in rows:
            actor = forge(r)
            detail = json.loads(r.detail) if isinstance(r.detail, str) else r.detail
            at = r.at if isinstance(r.at, datetime) else datetime.fromisoformat(str(r.at))
            doc = ch.event_document(
                seq=r.seq, at=at.replace(tzinfo=UTC), actor=actor, action=r.action,
                instance_id=r.instance_id, lease_id=r.lease_id, outcome=r.outcome,
                reason=r.reason, detail=detail,
            )
            h = ch.link_hash(prev, doc)
            await conn.execute(
                text("UPDATE audit_events SET actor=:a, prev_hash=:p, hash=:h WHERE seq=:s"),
                {"a": actor, "p": prev, "h": h, "s": r.seq},
            )
            prev = h
        await conn.execute(text("UPDATE audit_head SET hash=:h WHERE id=1"), {"h": prev})


def writer_on(s, clock, key, tmp_path, *, file=True, every_events=1000):
    settings = CheckpointSettings(
        every_events=every_events, every=EVERY, signer="file",
        file=tmp_path / "cp.jsonl" if file else None,
    )
    return CheckpointWriter(settings, s.audit, key, clock)


def mallory_to_alice(r) -> str:
    return "operator:alice" if r.action == "lock.removed" else r.actor


# -- 1: the writer signed whatever head the database held ---------------------------------


async def test_events_the_writer_checked_cannot_be_rewritten_and_then_signed(
    ledgers, tmp_path, caplog  # noqa: F811
):
    s = await ledgers()
    clock, key = ledgers.clock, FileSigner(Ed25519PrivateKey.generate())
    writer = writer_on(s, clock, key, tmp_path)
    await append(s, 5)
    assert (await writer.run_once()).seq == 5
    await append(s, 1, "operator:mallory", "lock.removed")
    await append(s, 1)
    assert await writer.run_once() is None  # a tick: not due, but the head is checked
    await rewrite(s, from_seq=6, forge=mallory_to_alice)
    clock.advance(EVERY + 1)
    with caplog.at_level(logging.ERROR, logger="broker.audit.writer"):
        assert await writer.run_once() is None  # refuses to sign the forged head
        assert await writer.run_once() is None  # and goes on refusing, every tick
    assert writer.refusals == 2
    refusal = next(r for r in caplog.records if "does not hold" in r.getMessage())
    assert refusal.seq == 7 and refusal.reason == "the event checked before was rewritten"
    assert [cp.seq for cp in await s.audit.checkpoints()] == [5]
    assert [json.loads(x)["seq"] for x in (tmp_path / "cp.jsonl").read_text().splitlines()] == [5]


async def test_a_restarted_writer_refuses_a_chain_rewritten_before_its_last_checkpoint(
    ledgers, tmp_path  # noqa: F811
):
    s = await ledgers()
    clock, key = ledgers.clock, FileSigner(Ed25519PrivateKey.generate())
    await append(s, 2)
    await append(s, 1, "operator:mallory", "lock.removed")
    await append(s, 2)
    assert (await writer_on(s, clock, key, tmp_path).run_once()).seq == 5
    await append(s, 2)
    await rewrite(s, from_seq=1, forge=mallory_to_alice)
    clock.advance(EVERY + 1)
    fresh = writer_on(s, clock, key, tmp_path)  # no memory: anchored on the signed seq 5
    assert await fresh.run_once() is None
    assert fresh.refusals == 1 and fresh.last is None
    assert [cp.seq for cp in await s.audit.checkpoints()] == [5]


async def test_an_untouched_chain_is_still_checkpointed_tick_after_tick(
    ledgers, tmp_path  # noqa: F811
):
    s = await ledgers()
    clock, key = ledgers.clock, FileSigner(Ed25519PrivateKey.generate())
    writer = writer_on(s, clock, key, tmp_path, every_events=3)
    await append(s, 1)
    assert (await writer.run_once()).seq == 1  # the first event: at once
    for _ in range(4):
        await append(s, 2)
        assert await writer.run_once() is None  # checked, not due
        await append(s, 1)
        assert (await writer.run_once()) is writer.last  # 3 since the last: signed
    assert writer.refusals == 0 and writer.ignored == 0
    assert writer.last is not None and writer.last.seq == 13
    # a restarted writer adopts the stored checkpoint (its signature verifies) and goes on
    fresh = writer_on(s, clock, key, tmp_path, every_events=3)
    await append(s, 3)
    assert (await fresh.run_once()).seq == 16 and fresh.refusals == 0


# -- 2: one forged checkpoint row stopped checkpointing ----------------------------------


async def test_a_forged_checkpoint_row_is_ignored_and_alerted_not_obeyed(
    ledgers, tmp_path, caplog  # noqa: F811
):
    s = await ledgers()
    clock, key = ledgers.clock, FileSigner(Ed25519PrivateKey.generate())
    writer = writer_on(s, clock, key, tmp_path, every_events=5)
    await append(s, 1)
    assert (await writer.run_once()).seq == 1
    async with s.database.transaction() as conn:
        for seq, at in ((9_000_000_000_000_000, "2099-01-01 00:00:00"), (3, "2099-01-01 00:00:00")):
            await conn.execute(
                text(
                    "INSERT INTO audit_checkpoints (seq, hash, at, signer, key_id, signature) "
                    "VALUES (:seq, 'x', :at, 'file', 'file:x', 'AA==')"
                ),
                {"seq": seq, "at": datetime.fromisoformat(at)},
            )
    await append(s, 50, "operator:mallory", "lock.removed")
    clock.advance(3600)
    with caplog.at_level(logging.ERROR, logger="broker.audit.writer"):
        cp = await writer.run_once()
    assert cp is not None and cp.seq == 51
    assert writer.ignored == 2 and writer.failures == 0 and writer.refusals == 0
    assert writer.age_s() == 0.0
    why = sorted(
        (r.seq, r.reason) for r in caplog.records if "cannot be genuine" in r.getMessage()
    )
    assert why == [(3, "it is dated in the future"),
                   (9_000_000_000_000_000, "it is ahead of the chain's head")]
    # a restarted writer is not fooled either: it anchors on seq 51 (signature checked)
    fresh = writer_on(s, clock, key, tmp_path, every_events=5)
    await append(s, 5)
    assert (await fresh.run_once()).seq == 56
    # a checkpoint row signed by another key, within the head and the clock: ignored too
    other = FileSigner(Ed25519PrivateKey.generate())
    rogue = writer_on(s, clock, other, tmp_path, every_events=1)
    await append(s, 1)
    assert (await rogue.run_once()).seq == 57
    await append(s, 4)
    assert (await fresh.run_once()).seq == 61  # 5 events since 56, not since 57
    assert fresh.ignored == 3  # 57, besides the two forged rows it saw at start


# -- 3: checkpoints deleted, the whole chain rewritten -----------------------------------


async def test_deleted_checkpoints_and_a_rewritten_chain_are_neither_signed_nor_ok(
    ledgers, tmp_path, caplog  # noqa: F811
):
    s = await ledgers()
    clock, key = ledgers.clock, FileSigner(Ed25519PrivateKey.generate())
    with caplog.at_level(logging.WARNING, logger="broker.audit.writer"):
        writer = writer_on(s, clock, key, tmp_path, file=False)
        await append(s, 5)
        assert (await writer.run_once()).seq == 5
    assert any("checkpoint.file is not set" in r.getMessage() for r in caplog.records)
    await append(s, 1, "operator:mallory", "lock.removed")
    await append(s, 1)
    await rewrite(s, from_seq=1, forge=lambda r: "forged" if r.seq == 3 else mallory_to_alice(r))
    async with s.database.transaction() as conn:
        await conn.execute(text("DELETE FROM audit_checkpoints"))
    sigs = Signatures()
    sigs.trust_file_key(key.public)
    limit = uncovered_limit(timedelta(seconds=EVERY))
    verification = AuditVerification(
        s.chain, check_signature=sigs.check_async, clock=clock, max_uncovered=limit
    )
    fresh = await verification.verify()
    assert fresh.ok  # events younger than the interval: a checkpoint may still come
    clock.advance(EVERY + 1)
    assert await writer.run_once() is None and writer.refusals == 1  # not signed
    clock.advance(limit.total_seconds())
    report = await verification.verify()
    assert not report.ok and report.tampered
    assert [(f.kind, f.seq) for f in report.findings] == [(UNCOVERED, 1)]
    events = await s.audit.events(AuditSelection(action="lock.removed"))
    assert events[0].actor == "operator:alice"  # the rewrite is there; verify said so


async def test_verify_with_the_external_file_still_catches_a_laundered_table(
    ledgers, tmp_path  # noqa: F811
):
    """The writer refused; the file the writer appended to holds checkpoint 5, which the
    rewritten table no longer matches."""
    s = await ledgers()
    clock, key = ledgers.clock, FileSigner(Ed25519PrivateKey.generate())
    writer = writer_on(s, clock, key, tmp_path)
    await append(s, 5)
    assert (await writer.run_once()).seq == 5
    await rewrite(s, from_seq=1, forge=lambda r: "forged" if r.seq == 3 else r.actor)
    async with s.database.transaction() as conn:
        await conn.execute(text("DELETE FROM audit_checkpoints"))
    sigs = Signatures()
    sigs.trust_file_key(key.public)
    report = await AuditVerification(
        s.chain,
        check_signature=sigs.check_async,
        external_checkpoints=file_checkpoints(tmp_path / "cp.jsonl"),
        clock=clock,
        max_uncovered=uncovered_limit(timedelta(seconds=EVERY)),
    ).verify()
    assert not report.ok and report.tampered
    assert [f.kind for f in report.findings] == ["checkpoint_mismatch"]


async def test_a_replica_that_signed_a_forged_head_does_not_launder_it_for_another(
    ledgers, tmp_path  # noqa: F811
):
    """Replica a checked the head; the chain is rewritten; replica b, just started (it
    checked nothing), signs the forged head. Replica a must not take b's checkpoint as
    its anchor: it still refuses."""
    s = await ledgers()
    clock, key = ledgers.clock, FileSigner(Ed25519PrivateKey.generate())
    a = writer_on(s, clock, key, tmp_path)
    await append(s, 5)
    assert (await a.run_once()).seq == 5
    await append(s, 1, "operator:mallory", "lock.removed")
    await append(s, 1)
    assert await a.run_once() is None  # checked seq 7, not due
    await rewrite(s, from_seq=6, forge=mallory_to_alice)
    clock.advance(EVERY + 1)
    b = writer_on(s, clock, key, tmp_path)
    assert (await b.run_once()).seq == 7  # b knew nothing past the checkpoint at 5
    await append(s, 1)
    clock.advance(EVERY + 1)
    assert await a.run_once() is None and a.refusals == 1
    assert a.last is not None and a.last.seq == 5


async def test_a_deleted_tail_or_anchor_event_is_refused(ledgers, tmp_path):  # noqa: F811
    s = await ledgers()
    clock, key = ledgers.clock, FileSigner(Ed25519PrivateKey.generate())
    writer = writer_on(s, clock, key, tmp_path)
    await append(s, 5)
    assert (await writer.run_once()).seq == 5
    await append(s, 3)
    assert await writer.run_once() is None  # checked seq 8
    async with s.database.transaction() as conn:  # the tail cut, the head moved back
        await conn.execute(text("DELETE FROM audit_events WHERE seq > 6"))
        head = (await conn.execute(text("SELECT hash FROM audit_events WHERE seq = 6"))).scalar()
        await conn.execute(text("UPDATE audit_head SET seq = 6, hash = :h WHERE id = 1"),
                           {"h": head})
    clock.advance(EVERY + 1)
    assert await writer.run_once() is None and writer.refusals == 1
    fresh = writer_on(s, clock, key, tmp_path)  # anchored on the checkpoint at seq 5
    async with s.database.transaction() as conn:  # and the checkpointed event itself gone
        await conn.execute(text("DELETE FROM audit_events WHERE seq = 5"))
    assert await fresh.run_once() is None and fresh.refusals == 1
