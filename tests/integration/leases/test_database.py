"""Database: the schema revision check."""

from __future__ import annotations


async def test_migrated_store_reports_its_revision(ledgers):
    s = await ledgers()
    assert await s.database.is_migrated()
