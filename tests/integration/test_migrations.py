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
        assert head_revision() == "0006"
    finally:
        if name:
            await asyncio.to_thread(pg.drop_database, name)
