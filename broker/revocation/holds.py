"""What Vault still holds of a job's leases, by its own word: one LIST of a path that holds
many of them, a lookup each for the few; and the wait while Vault works through the
leases a token's revocation queued."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from broker.errors import BrokerError, RevocationWaiting, UpstreamRejected, UpstreamUnavailable
from broker.leases import LeaseView, TokenView
from broker.revocation.bounded import Bounded

# From this many of a job's leases under one Vault path, one LIST confirms them all, and
# they are left to their token's revocation (Vault revokes them itself) instead of being
# revoked one request each.
LIST_CONFIRM_MIN = 16
# Waiting for Vault to revoke what a token's revocation queued: a poll every tenth of the
# time waited so far (so that seeing the end late costs at most a tenth more), within
# QUEUE_POLL_FIRST_S and QUEUE_POLL_MAX_S; without progress for
# QUEUE_STALL_S (or after QUEUE_WAIT_MAX_S in all) what is left is revoked one by one.
QUEUE_POLL_FIRST_S = 0.02
QUEUE_POLL_MAX_S = 0.5
QUEUE_STALL_S = 2.0
QUEUE_WAIT_MAX_S = 120.0
# How often Vault is asked again whether it runs as one node (``sys/leader``).
ALONE_RECHECK_S = 60.0


@dataclass(frozen=True)
class Survey:
    """Which of the leases asked about Vault holds (``held``), and which of those a LIST
    showed (``listed``): only a lease a LIST showed present may later be taken for gone on
    its absence from a LIST (a listing can lag, or come from somewhere else)."""

    held: set[str]
    listed: frozenset[str]


class VaultLeaseReads(Protocol):
    """What is asked of Vault (``broker.vault.VaultClient``)."""

    async def runs_alone(self) -> bool: ...

    async def lease_exists(self, lease_id: str) -> bool: ...

    async def list_lease_keys(self, prefix: str) -> list[str]: ...


class Holdings:
    """Vault's word on which of a job's leases it still holds (the calls bounded with the
    worker's other Vault calls)."""

    def __init__(self, vault: VaultLeaseReads, bounded: Bounded) -> None:
        self._vault = vault
        self._bounded = bounded
        self._alone: tuple[float, bool] | None = None  # (asked at, answer)

    async def _lists_are_vaults_word(self) -> bool:
        """A LIST is Vault's own word only when Vault runs as one node; in an HA cluster a
        standby may answer it from a copy that lags, and every lease is looked up
        instead. Asked again every ``ALONE_RECHECK_S``."""
        now = asyncio.get_running_loop().time()
        if self._alone is None or now - self._alone[0] > ALONE_RECHECK_S:
            self._alone = (now, await self._vault.runs_alone())
        return self._alone[1]

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
        self, vault_lease_ids: list[str], *, trusted: Collection[str] = ()
    ) -> set[str]:
        """The leases Vault still holds, by its own word (``survey``)."""
        return (await self.survey(vault_lease_ids, trusted=trusted)).held

    async def survey(
        self, vault_lease_ids: list[str], *, trusted: Collection[str] = ()
    ) -> Survey:
        """The leases Vault still holds, by its own word. Many leases under one path are
        checked with one LIST of that path (an instance with 1,000 leases costs Vault one
        listing, not 1,000 lookups); a few, or a path that cannot be listed, one lookup
        each, and every one when Vault runs as an HA cluster (a LIST may then come from
        a standby that lags). A lease Vault will not answer for counts as held. A lease the
        LIST lacks counts as gone only if it is ``trusted`` (the caller's word: a LIST of
        this pass showed it and a revocation of ours covers it); any other is looked up:
        a listing alone is no proof that a lease is gone. (A lease whose synchronous
        revocation Vault answered is not asked about at all: the answer says it is gone.)"""
        by_path: dict[str, list[str]] = {}
        for lease_id in vault_lease_ids:
            by_path.setdefault(lease_id.rsplit("/", 1)[0], []).append(lease_id)
        listed_held: set[str] = set()
        lookups: list[str] = []
        listable = await self._lists_are_vaults_word()
        for path, ids in by_path.items():
            if len(ids) < LIST_CONFIRM_MIN or not listable:
                lookups.extend(ids)
                continue
            try:
                keys = await self._bounded(self._vault.list_lease_keys, path)
            except UpstreamRejected:
                lookups.extend(ids)  # not listable (policy, path): ask one by one
                continue
            listed = {f"{path}/{key}" for key in keys}
            listed_held.update(i for i in ids if i in listed)
            lookups.extend(i for i in ids if i not in listed and i not in trusted)
        answers = await self.each(self._vault.lease_exists, lookups)
        looked_up = {i for i, exists in zip(lookups, answers, strict=True) if exists is not False}
        return Survey(held=listed_held | looked_up, listed=frozenset(listed_held))

    async def wait_for_queue(
        self,
        vault_lease_ids: list[str],
        *,
        trusted: Collection[str],
        stopping: Callable[[], bool] = lambda: False,
    ) -> set[str]:
        """Poll Vault while it revokes what a token's revocation queued, as long as it
        makes progress (``QUEUE_STALL_S`` without one ends the wait, and so does
        ``QUEUE_WAIT_MAX_S``); returns what it still holds then. The polls start short and
        grow with the wait, so that a long wait costs Vault few listings."""
        ids = list(vault_lease_ids)
        loop = asyncio.get_running_loop()
        start = last_progress = loop.time()
        pause = QUEUE_POLL_FIRST_S
        while ids:
            if stopping():
                raise RevocationWaiting("the broker is stopping: the job is taken up again")
            now = loop.time()
            if now - last_progress > QUEUE_STALL_S or now - start > QUEUE_WAIT_MAX_S:
                break
            await asyncio.sleep(pause)
            pause = min(max(QUEUE_POLL_FIRST_S, (loop.time() - start) / 10), QUEUE_POLL_MAX_S)
            still = await self.held(ids, trusted=trusted)
            if len(still) < len(ids):
                last_progress = loop.time()
            ids = [i for i in ids if i in still]
        return set(ids)


def left_to_token(
    recorded: list[LeaseView], tokens: Sequence[TokenView], listed: frozenset[str]
) -> tuple[list[LeaseView], list[LeaseView]]:
    """The recorded leases revoked one by one, and those left to their token's revocation
    (the worker's step 2): many under one path, issued under a token not yet revoked, and
    shown present by a LIST of this pass (``listed``): only then does their absence from a
    later LIST tell that the token's revocation took them."""
    live = {token.accessor for token in tokens if token.revoked_at is None}
    paths = [str(lease.vault_lease_id).rsplit("/", 1)[0] for lease in recorded]
    per_path = Counter(paths)
    to_token = [
        per_path[path] >= LIST_CONFIRM_MIN
        and lease.token_accessor in live
        and lease.external_ref is None
        and lease.vault_lease_id in listed
        for lease, path in zip(recorded, paths, strict=True)
    ]
    return (
        [lease for lease, left in zip(recorded, to_token, strict=True) if not left],
        [lease for lease, left in zip(recorded, to_token, strict=True) if left],
    )
