"""What Vault still holds of a job's leases, by its own word: one LIST of a path that holds
many of them, a lookup each for the few; and the wait while Vault works through the
leases a token's revocation queued."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from broker.errors import BrokerError, UpstreamRejected, UpstreamUnavailable
from broker.revocation.bounded import Bounded

# From this many of a job's leases under one Vault path, one LIST confirms them all, and
# they are left to their token's revocation (Vault revokes them itself) instead of being
# revoked one request each.
LIST_CONFIRM_MIN = 16
# Waiting for Vault to revoke what a token's revocation queued: the first poll after this
# long, each next one 1.3 times later up to QUEUE_POLL_MAX_S; without progress for
# QUEUE_STALL_S (or after QUEUE_WAIT_MAX_S in all) what is left is revoked one by one.
QUEUE_POLL_FIRST_S = 0.02
QUEUE_POLL_MAX_S = 0.5
QUEUE_STALL_S = 2.0
QUEUE_WAIT_MAX_S = 120.0


class VaultLeaseReads(Protocol):
    """What is asked of Vault (``broker.vault.VaultClient``)."""

    async def lease_exists(self, lease_id: str) -> bool: ...

    async def list_lease_keys(self, prefix: str) -> list[str]: ...


class Holdings:
    """Vault's word on which of a job's leases it still holds (the calls bounded with the
    worker's other Vault calls)."""

    def __init__(self, vault: VaultLeaseReads, bounded: Bounded) -> None:
        self._vault = vault
        self._bounded = bounded

    async def each(
        self, call: Callable[[str], Awaitable[bool]], vault_lease_ids: list[str]
    ) -> list[bool | BrokerError]:
        """``call`` on each Vault lease id, bounded. Vault refusing one
        lease is that lease's outcome, and the others go on; Vault away ends the pass at
        once, and the calls not yet answered are cancelled, not left running behind a retry."""

        async def one(lease_id: str) -> bool | BrokerError:
            try:
                return await self._bounded(call, lease_id)
            except UpstreamUnavailable:
                raise
            except BrokerError as exc:
                return exc

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(lease_id)) for lease_id in vault_lease_ids]
        except* UpstreamUnavailable as away:
            raise away.exceptions[0] from None
        return [task.result() for task in tasks]

    async def held(
        self, vault_lease_ids: list[str], *, confirm_absent: bool = False
    ) -> set[str]:
        """The leases Vault still holds, by its own word. Many leases under one path are
        checked with one LIST of that path (an instance with 1,000 leases costs Vault one
        listing, not 1,000 lookups); a few, or a path that cannot be listed, one lookup
        each. A lease Vault will not answer for counts as held. ``confirm_absent``: a lease
        the LIST lacks is looked up too before it counts as gone (a listing is no proof
        that Vault forgot a lease nobody revoked)."""
        by_path: dict[str, list[str]] = {}
        for lease_id in vault_lease_ids:
            by_path.setdefault(lease_id.rsplit("/", 1)[0], []).append(lease_id)
        held: set[str] = set()
        lookups: list[str] = []
        for path, ids in by_path.items():
            if len(ids) < LIST_CONFIRM_MIN:
                lookups.extend(ids)
                continue
            try:
                listed = {f"{path}/{key}" for key in await self._vault.list_lease_keys(path)}
            except UpstreamRejected:
                lookups.extend(ids)  # not listable (policy, path): ask one by one
                continue
            held.update(i for i in ids if i in listed)
            if confirm_absent:
                lookups.extend(i for i in ids if i not in listed)
        answers = await self.each(self._vault.lease_exists, lookups)
        held.update(i for i, exists in zip(lookups, answers, strict=True) if exists is not False)
        return held

    async def wait_for_queue(self, vault_lease_ids: list[str]) -> set[str]:
        """Poll Vault while it revokes what a token's revocation queued, as long as it
        makes progress (``QUEUE_STALL_S`` without one ends the wait, and so does
        ``QUEUE_WAIT_MAX_S``); returns what it still holds then. The polls start short and
        grow, so that a long wait costs Vault few listings."""
        ids = list(vault_lease_ids)
        loop = asyncio.get_running_loop()
        start = last_progress = loop.time()
        pause = QUEUE_POLL_FIRST_S
        while ids:
            now = loop.time()
            if now - last_progress > QUEUE_STALL_S or now - start > QUEUE_WAIT_MAX_S:
                break
            await asyncio.sleep(pause)
            pause = min(pause * 1.3, QUEUE_POLL_MAX_S)
            still = await self.held(ids)
            if len(still) < len(ids):
                last_progress = loop.time()
            ids = [i for i in ids if i in still]
        return set(ids)
