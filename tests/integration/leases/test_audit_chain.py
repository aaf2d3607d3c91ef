"""The audit chain on the real stores: tampering with the tables directly is named by
verification, seq by seq; replicas appending at once keep one unbroken chain; a store
upgraded from before the chain verifies; a rolled-back transaction leaves no event."""

from __future__ import annotations

import asyncio
import secrets
from datetime import timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import text

from broker.audit.service import AuditVerification
from broker.clock import FixedClock
from broker.leases import CheckpointView, Database, LeaseState, Ledgers
from broker.leases.migrations import alembic_config, migrate
from broker.leases.settings import StoreSettings
from broker.leases.sql.common import audit
from tests.integration.leases.support import T0, complete, issue

N = 30


async def write_events(s: Ledgers, n: int = N) -> None:
    """``n`` events: issuance's own, and reconcile findings to make up the number."""
    lease = await issue(s, "i-story")
    await complete(s, lease)  # lease.issued
    await s.issuance.set_lease_expiry(lease, T0 + timedelta(hours=1), True)  # lease.renewed
    for i in range(n - 2):
        await s.reconcile.record_audit("reconciler", "reconcile.orphans", count=i)


async def sql(s: Ledgers, statement: str, **params) -> None:
    async with s.database.transaction() as conn:
        await conn.execute(text(statement), params)


async def hash_at(s: Ledgers, seq: int) -> str:
    value = await s.chain.event_hash(seq)
    assert value is not None
    return value


def kinds(report) -> list[tuple[str, int]]:
    return [(f.kind, f.seq) for f in report.findings]


async def test_an_untouched_chain_verifies_from_the_start_and_from_a_seq(ledgers):
    s = await ledgers()
    await write_events(s)
    report = await AuditVerification(s.chain, page=7).verify()
    assert report.ok, report.findings
    assert (report.events, report.last_seq) == (N, N)
    later = await AuditVerification(s.chain, page=7).verify(12)
    assert later.ok and later.events == N - 11


async def test_a_changed_field_is_named(ledgers):
    s = await ledgers()
    await write_events(s)
    await sql(s, "UPDATE audit_events SET actor = 'operator:nobody' WHERE seq = 7")
    report = await AuditVerification(s.chain).verify()
    assert kinds(report) == [("altered", 7)] and report.first_bad_seq == 7


async def test_a_deleted_event_is_named(ledgers):
    s = await ledgers()
    await write_events(s)
    await sql(s, "DELETE FROM audit_events WHERE seq = 9")
    assert kinds(await AuditVerification(s.chain).verify()) == [("gap", 9)]


async def test_a_deleted_tail_is_named_by_the_checkpoint_and_the_head(ledgers):
    s = await ledgers()
    await write_events(s)
    last = await hash_at(s, N)
    await sql(
        s,
        "INSERT INTO audit_checkpoints (seq, hash, at, signer, key_id, signature) "
        "VALUES (:seq, :hash, :at, 'file', 'k', 'sig')",
        seq=N, hash=last, at=T0.replace(tzinfo=None),
    )
    await sql(s, "DELETE FROM audit_events WHERE seq > :n", n=N - 5)
    assert kinds(await AuditVerification(s.chain).verify()) == [("truncated", N - 4)] * 2
    # The head row and the table's checkpoints cut back too: a checkpoint kept outside the
    # database still names it.
    keep = await hash_at(s, N - 5)
    await sql(s, "UPDATE audit_head SET seq = :n, hash = :h", n=N - 5, h=keep)
    await sql(s, "DELETE FROM audit_checkpoints")
    assert (await AuditVerification(s.chain).verify()).ok  # nothing inside can tell

    async def external():
        return [CheckpointView(N, last, T0, "file", "k", "sig", source="external")]

    report = await AuditVerification(s.chain, external_checkpoints=external).verify()
    assert kinds(report) == [("truncated", N - 4)]
    assert "(external)" in report.findings[0].message


async def test_two_events_swapped_are_named(ledgers):
    s = await ledgers()
    await write_events(s)
    await sql(s, "UPDATE audit_events SET seq = -1 WHERE seq = 5")
    await sql(s, "UPDATE audit_events SET seq = 5 WHERE seq = 8")
    await sql(s, "UPDATE audit_events SET seq = 8 WHERE seq = -1")
    found = kinds(await AuditVerification(s.chain).verify())
    assert ("moved", 5) in found and ("moved", 8) in found
    assert ("reordered", 6) in found


async def test_a_checkpoint_that_does_not_match_and_a_bad_signature(ledgers):
    s = await ledgers()
    await write_events(s)
    await sql(
        s,
        "INSERT INTO audit_checkpoints (seq, hash, at, signer, key_id, signature) "
        "VALUES (10, :hash, :at, 'file', 'k', 'forged')",
        hash="ab" * 32, at=T0.replace(tzinfo=None),
    )

    async def check(cp: CheckpointView) -> bool:
        return cp.signature != "forged"

    report = await AuditVerification(s.chain, check_signature=check).verify()
    assert kinds(report) == [("checkpoint_mismatch", 10), ("bad_signature", 10)]
    assert report.signatures_checked


async def test_a_rolled_back_transaction_leaves_no_event(ledgers):
    s = await ledgers()
    with pytest.raises(RuntimeError):
        async with s.database.transaction() as conn:
            await audit(conn, ledgers.clock, "test", "never.committed")
            raise RuntimeError("rolled back")
    await s.reconcile.record_audit("test", "committed")
    report = await AuditVerification(s.chain).verify()
    assert report.ok and report.events == 1
    async with s.database.transaction(readonly=True) as conn:
        actions = (await conn.execute(text("SELECT action FROM audit_events"))).scalars().all()
    assert actions == ["committed"]


async def test_several_events_of_one_transaction_are_consecutive(ledgers):
    s = await ledgers()
    leases = [await issue(s, f"i-{n}") for n in range(3)]
    for lease in leases:
        await complete(s, lease)
    moved = await s.jobs.mark_leases_ended(leases, LeaseState.REVOKED, actor="w1")
    assert moved == 3
    async with s.database.transaction(readonly=True) as conn:
        rows = (
            await conn.execute(text("SELECT seq, action, at FROM audit_events ORDER BY seq"))
        ).all()
    revoked = [r for r in rows if r.action == "leases.revoked"]
    assert [r.seq for r in revoked] == [4, 5, 6] and len({r.at for r in revoked}) == 1
    assert (await AuditVerification(s.chain).verify()).ok


async def test_replicas_appending_at_once_keep_one_chain(ledgers):
    replicas = [await ledgers() for _ in range(2)]
    tasks_per_replica, rounds = 4, 30

    async def writer(s: Ledgers, name: str) -> None:
        for i in range(rounds):
            if i % 3 == 0:  # a transaction with several events
                lease_ids = [await issue(s, f"{name}-{i}-{k}") for k in range(2)]
                for lease in lease_ids:
                    await complete(s, lease)
                await s.jobs.mark_leases_ended(lease_ids, LeaseState.REVOKED, actor=name)
            else:
                await s.reconcile.record_audit(name, "reconcile.orphans", i=i)

    await asyncio.gather(*(
        writer(s, f"r{r}-t{t}") for r, s in enumerate(replicas) for t in range(tasks_per_replica)
    ))
    s = replicas[0]
    report = await AuditVerification(s.chain).verify()
    assert report.ok, report.findings[:5]
    head = await s.chain.head()
    assert report.events == head[0] == report.last_seq
    # 10 rounds of 2 issued + 2 revoked, 20 single events: per writer task.
    assert report.events == 2 * tasks_per_replica * (10 * 4 + 20)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_events_from_before_the_chain_are_chained_by_the_upgrade(backend, pg, workdir):
    name = None
    if backend == "sqlite":
        url = f"sqlite:///{workdir / ('old-' + secrets.token_hex(6) + '.db')}"
    else:
        name = await asyncio.to_thread(pg.create_database)
        url = pg.url(name)
    try:
        await asyncio.to_thread(command.upgrade, alembic_config(url), "0004")
        old = sa.table(
            "audit_events", sa.column("id"), sa.column("at", sa.DateTime()),
            sa.column("actor"), sa.column("action"), sa.column("instance_id"),
            sa.column("lease_id"), sa.column("detail", sa.JSON()),
        )
        engine = sa.create_engine(alembic_config(url).attributes["database_url"])
        with engine.begin() as conn:
            conn.execute(old.insert(), [
                {"at": (T0 + timedelta(seconds=i)).replace(tzinfo=None),
                 "actor": "admin", "action": "instance.terminate_requested",
                 "instance_id": f"i-{i}", "lease_id": None, "detail": {"job_id": f"j-{i}"}}
                for i in range(1, 11)
            ])
            # ids with holes, as rolled-back inserts leave them in a sequence
            conn.execute(sa.text("DELETE FROM audit_events WHERE id IN (2, 5, 9)"))
        engine.dispose()
        await asyncio.to_thread(migrate, url)
        db = Database(StoreSettings(url=url))
        await db.start()
        try:
            s = Ledgers.on(db, FixedClock(T0 + timedelta(hours=1)))
            assert await s.chain.head() == (7, await s.chain.event_hash(7))
            await s.reconcile.record_audit("reconciler", "after.upgrade")
            report = await AuditVerification(s.chain).verify()
            assert report.ok, report.findings
            assert (report.events, report.last_seq) == (8, 8)
        finally:
            await db.close()
    finally:
        if name:
            await asyncio.to_thread(pg.drop_database, name)
