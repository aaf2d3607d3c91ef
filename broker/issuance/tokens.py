"""Instance tokens held in memory, by instance.

Losing this cache loses nothing: the accessors are in the store (recorded *before* a token
is used), and a replica without a cached token simply mints another one for the instance.
Revocation revokes every recorded accessor.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from datetime import datetime, timedelta
from typing import Protocol

from broker.clock import Clock
from broker.errors import InstanceTerminated
from broker.identity.model import Identity
from broker.vault import InstanceToken
from broker.vault.settings import TOKEN_REUSE_MARGIN_S


class TokenMinter(Protocol):
    async def create_instance_token(
        self, *, instance_id: str, workload: str, issuer: str
    ) -> InstanceToken: ...

    async def revoke_accessor(self, accessor: str) -> bool: ...


class TokenRecorder(Protocol):
    """Where accessors are recorded before their token is used (``IssuanceRecords``)."""

    async def record_token(
        self, *, instance_id: str, accessor: str, expires_at: datetime
    ) -> None: ...


# A token is reused only if it outlives the new lease by this much.
REUSE_MARGIN = timedelta(seconds=TOKEN_REUSE_MARGIN_S)


class InstanceTokens:
    def __init__(
        self, vault: TokenMinter, store: TokenRecorder, clock: Clock, max_entries: int = 100_000
    ) -> None:
        self._vault = vault
        self._store = store
        self._clock = clock
        self._max = max_entries
        self._tokens: OrderedDict[str, InstanceToken] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def for_lease(self, identity: Identity, ttl: int) -> InstanceToken:
        key = identity.instance_id
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if (
                cached
                and cached.expires_at - self._clock.now() >= timedelta(seconds=ttl) + REUSE_MARGIN
            ):
                self._tokens.move_to_end(key)
                return cached
            token = await self._vault.create_instance_token(
                instance_id=key, workload=identity.workload, issuer=identity.issuer_name
            )
            try:
                await self._store.record_token(
                    instance_id=key, accessor=token.accessor, expires_at=token.expires_at
                )
            except InstanceTerminated:
                await self._vault.revoke_accessor(token.accessor)
                raise
            except Exception:
                # Unrecorded, so unusable: revoke it now rather than leave it to expire.
                with contextlib.suppress(Exception):
                    await self._vault.revoke_accessor(token.accessor)
                raise
            self._tokens[key] = token
            while len(self._tokens) > self._max:
                self._tokens.popitem(last=False)
            return token

    def forget(self, instance_id: str) -> None:
        self._tokens.pop(instance_id, None)

    def prune(self) -> int:
        now = self._clock.now()
        stale = [k for k, t in self._tokens.items() if t.expires_at - now < REUSE_MARGIN]
        for k in stale:
            del self._tokens[k]
        for k in [k for k, lock in self._locks.items() if not lock.locked()]:
            del self._locks[k]
        return len(stale)
