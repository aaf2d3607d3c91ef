"""The ledgers on every database backend: SQLite and PostgreSQL, real databases, migrated.

``ledgers()`` opens one more ``Database`` on the same fresh database (several = several
replicas) and returns every ledger on it; ``ledgers.clock`` is their shared clock."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from broker.clock import FixedClock
from broker.leases import Database, Ledgers
from broker.leases.migrations import migrate
from broker.leases.settings import StoreSettings
from tests.integration.leases.support import T0


@pytest.fixture(params=["sqlite", "postgresql"])
async def ledgers(request, pg, workdir):
    if request.param == "sqlite":
        url = f"sqlite:///{workdir / ('suite-' + secrets.token_hex(6) + '.db')}"
        name = None
    else:
        name = await asyncio.to_thread(pg.create_database)
        url = pg.url(name)
    await asyncio.to_thread(migrate, url)
    clock = FixedClock(T0)
    opened: list[Database] = []

    async def make() -> Ledgers:
        db = Database(StoreSettings(url=url))
        await db.start()
        opened.append(db)
        return Ledgers.on(db, clock)

    make.clock = clock  # type: ignore[attr-defined]
    yield make
    for db in opened:
        await db.close()
    if name:
        await asyncio.to_thread(pg.drop_database, name)
