"""Models and migrations cannot drift: upgrade head, then `alembic check`, on both stores."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from alembic import command

from broker.leases.migrations import alembic_config, head_revision, migrate


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_upgrade_head_then_check_finds_no_drift(backend, pg, workdir):
    name = None
    if backend == "sqlite":
        url = f"sqlite:///{workdir / ('mig-' + secrets.token_hex(6) + '.db')}"
    else:
        name = await asyncio.to_thread(pg.create_database)
        url = pg.url(name)
    try:
        await asyncio.to_thread(migrate, url)
        await asyncio.to_thread(migrate, url)  # idempotent
        await asyncio.to_thread(command.check, alembic_config(url))
        assert head_revision() == "0010"
    finally:
        if name:
            await asyncio.to_thread(pg.drop_database, name)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_0006_stamps_leases_older_code_may_have_sent_a_revocation_for(backend, pg, workdir):
    """Upgraded with a revocation in flight: a lease left ``revoking``, a live lease of an
    instance whose job is not done, one whose instance token was revoked get
    ``revoke_sent_at`` (or Vault not knowing them would read as ``lost``); a live lease of
    an instance no one terminates, and an ended one, do not."""
    from datetime import UTC, datetime

    from sqlalchemy import create_engine, text

    from broker.leases.migrations import sync_url

    name = None
    if backend == "sqlite":
        url = f"sqlite:///{workdir / ('mig-' + secrets.token_hex(6) + '.db')}"
    else:
        name = await asyncio.to_thread(pg.create_database)
        url = pg.url(name)
    t = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    engine = create_engine(sync_url(url))
    try:
        await asyncio.to_thread(command.upgrade, alembic_config(url), "0005")
        with engine.begin() as conn:
            for inst, state in (("i-job", "terminating"), ("i-tok", "active"),
                                ("i-live", "active"), ("i-done", "terminated")):
                conn.execute(text(
                    "INSERT INTO instances (instance_id, state, created_at, updated_at) "
                    "VALUES (:i, :s, :t, :t)"), {"i": inst, "s": state, "t": t})
            conn.execute(text(
                "INSERT INTO instance_tokens (accessor, instance_id, created_at, expires_at, "
                "revoked_at) VALUES ('acc-tok', 'i-tok', :t, :t, :t), "
                "('acc-live', 'i-live', :t, :t, NULL)"), {"t": t})
            for job, inst, state in (("j-1", "i-job", "failed"), ("j-2", "i-done", "done")):
                conn.execute(text(
                    "INSERT INTO revocation_jobs (job_id, instance_id, state, attempts, "
                    "next_attempt_at, requested_by, created_at, updated_at) "
                    "VALUES (:j, :i, :s, 1, :t, 'admin', :t, :t)"),
                    {"j": job, "i": inst, "s": state, "t": t})
            for lid, inst, state, acc in (
                    ("l-revoking", "i-live", "revoking", "acc-live"),
                    ("l-job", "i-job", "active", None),
                    ("l-tok", "i-tok", "active", "acc-tok"),
                    ("l-live", "i-live", "active", "acc-live"),
                    ("l-ended", "i-done", "revoked", None)):
                conn.execute(text(
                    "INSERT INTO leases (lease_id, instance_id, workload, role, kind, state, "
                    "vault_lease_id, token_accessor, renewable, created_at, updated_at) "
                    "VALUES (:l, :i, 'w', 'r', 'k', :s, :v, :a, false, :t, :t)"),
                    {"l": lid, "i": inst, "s": state, "v": f"db/creds/r/{lid}", "a": acc,
                     "t": t})
        await asyncio.to_thread(migrate, url)
        with engine.begin() as conn:
            rows = conn.execute(text("SELECT lease_id, revoke_sent_at FROM leases")).all()
        stamped = {lid for lid, at in rows if at is not None}
        assert stamped == {"l-revoking", "l-job", "l-tok"}
    finally:
        engine.dispose()
        if name:
            await asyncio.to_thread(pg.drop_database, name)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_0007_adds_the_resolution_and_a_downgrade_lists_resolved_leases_lost_again(
        backend, pg, workdir):
    """Upgraded, a lost lease stays lost with no resolution; downgraded, a lease an operator
    had resolved is lost again (the code before knows no ``resolved``: it is listed as a
    problem again, never hidden) and the columns are gone."""
    from datetime import UTC, datetime

    from sqlalchemy import create_engine, inspect, text

    from broker.leases.migrations import sync_url

    name = None
    if backend == "sqlite":
        url = f"sqlite:///{workdir / ('mig-' + secrets.token_hex(6) + '.db')}"
    else:
        name = await asyncio.to_thread(pg.create_database)
        url = pg.url(name)
    t = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    engine = create_engine(sync_url(url))
    try:
        await asyncio.to_thread(command.upgrade, alembic_config(url), "0006")
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO instances (instance_id, state, created_at, updated_at) "
                "VALUES ('i-1', 'terminated', :t, :t)"), {"t": t})
            for lid, state in (("l-lost", "lost"), ("l-gone", "revoked")):
                conn.execute(text(
                    "INSERT INTO leases (lease_id, instance_id, workload, role, kind, state, "
                    "vault_lease_id, renewable, created_at, updated_at, ended_at) "
                    "VALUES (:l, 'i-1', 'w', 'r', 'k', :s, :v, false, :t, :t, :t)"),
                    {"l": lid, "s": state, "v": f"db/creds/r/{lid}", "t": t})
        await asyncio.to_thread(migrate, url)
        with engine.begin() as conn:
            rows = conn.execute(text(
                "SELECT lease_id, state, resolved_at, resolved_by, resolved_reason, "
                "resolved_incident FROM leases ORDER BY lease_id")).all()
            assert [tuple(r) for r in rows] == [
                ("l-gone", "revoked", None, None, None, None),
                ("l-lost", "lost", None, None, None, None)]
            conn.execute(text(
                "UPDATE leases SET state = 'resolved', resolved_at = :t, "
                "resolved_by = 'operator:alice', resolved_reason = 'by hand' "
                "WHERE lease_id = 'l-lost'"), {"t": t})
        await asyncio.to_thread(command.downgrade, alembic_config(url), "0006")
        with engine.begin() as conn:
            rows = conn.execute(text(
                "SELECT lease_id, state FROM leases ORDER BY lease_id")).all()
        assert [tuple(r) for r in rows] == [("l-gone", "revoked"), ("l-lost", "lost")]
        columns = {c["name"] for c in inspect(engine).get_columns("leases")}
        assert not {c for c in columns if c.startswith("resolved_")}
    finally:
        engine.dispose()
        if name:
            await asyncio.to_thread(pg.drop_database, name)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_0009_adds_the_reconciler_indexes_and_a_downgrade_drops_them(backend, pg, workdir):
    """Indexes only: down to 0008 and up again, and the store has them back."""
    from sqlalchemy import create_engine, text

    from broker.leases.migrations import sync_url

    name = None
    if backend == "sqlite":
        url = f"sqlite:///{workdir / ('mig-' + secrets.token_hex(6) + '.db')}"
    else:
        name = await asyncio.to_thread(pg.create_database)
        url = pg.url(name)
    engine = create_engine(sync_url(url))
    added = {("leases", "ix_leases_vault_path"), ("leases", "ix_leases_unsent_live_path"),
             ("instances", "ix_instances_active_unseen")}

    # From the catalog: SQLAlchemy's reflection skips SQLite's index on an expression.
    catalog = text(
        "SELECT tbl_name, name FROM sqlite_master WHERE type = 'index'"
        if backend == "sqlite"
        else "SELECT tablename, indexname FROM pg_indexes WHERE schemaname = 'public'"
    )

    def indexes() -> set[tuple[str, str]]:
        with engine.connect() as conn:
            return {(r[0], r[1]) for r in conn.execute(catalog)}

    try:
        await asyncio.to_thread(migrate, url)
        assert added <= await asyncio.to_thread(indexes)
        await asyncio.to_thread(command.downgrade, alembic_config(url), "0008")
        assert not added & await asyncio.to_thread(indexes)
        await asyncio.to_thread(migrate, url)
        assert added <= await asyncio.to_thread(indexes)
    finally:
        engine.dispose()
        if name:
            await asyncio.to_thread(pg.drop_database, name)


async def test_0010_adds_the_termination_functions_and_a_downgrade_drops_them(pg):
    """PostgreSQL only (SQLite gets nothing): down to 0009 and up again."""
    from sqlalchemy import create_engine, text

    from broker.leases.migrations import sync_url

    name = await asyncio.to_thread(pg.create_database)
    url = pg.url(name)
    engine = create_engine(sync_url(url))

    def functions() -> set[str]:
        with engine.connect() as conn:
            query = text("SELECT proname FROM pg_proc WHERE proname LIKE 'broker_%'")
            return {r[0] for r in conn.execute(query)}

    added = {"broker_request_termination", "broker_finish_job"}
    try:
        await asyncio.to_thread(migrate, url)
        assert added <= await asyncio.to_thread(functions)
        await asyncio.to_thread(command.downgrade, alembic_config(url), "0009")
        left = await asyncio.to_thread(functions)
        assert not added & left and "broker_begin_issue" in left
        await asyncio.to_thread(migrate, url)
        assert added <= await asyncio.to_thread(functions)
    finally:
        engine.dispose()
        await asyncio.to_thread(pg.drop_database, name)
