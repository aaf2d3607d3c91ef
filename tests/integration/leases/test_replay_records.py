"""ReplayRecords: keys used once, under their namespace."""

from __future__ import annotations

from datetime import timedelta

from tests.integration.leases.support import T0


async def test_use_once_remembers_a_key_per_namespace(ledgers):
    s = await ledgers()
    assert await s.replay.use_once(
        "@event-webhook", "ab" * 32, keep_until=T0 + timedelta(minutes=5)
    )
    assert not await s.replay.use_once("@event-webhook", "ab" * 32, keep_until=T0)
    assert await s.replay.is_used("@event-webhook", "ab" * 32)
    assert not await s.replay.is_used("dev", "ab" * 32)  # namespaces are apart
