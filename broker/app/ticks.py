"""The periodic work of the broker, each as one ``run_once`` for a ``supervisor.Tick``.

Work done by ticks is claimed from the lease database, so the same tick on several
replicas is safe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from broker.api.metrics import Metrics
from broker.clock import Clock
from broker.errors import BrokerError
from broker.identity import IdentityVerifier
from broker.identity.settings import MAX_LEEWAY_SECONDS
from broker.issuance.tokens import InstanceTokens
from broker.leases import ReplayRecords, SightingRecords
from broker.liveness.sightings import Sightings
from broker.revocation.reconcile import Reconciler, ReconcileReport
from broker.revocation.worker import RevocationWorker
from broker.vault import VaultClient

log = logging.getLogger(__name__)
# A used token id is kept this long past its token's expiry: the leeway, plus the time a
# request may spend between verifying a token and recording it, plus clock skew between
# replicas (each prunes by its own clock).
REPLAY_PRUNE_GRACE = timedelta(seconds=MAX_LEEWAY_SECONDS + 600)
# Sightings are written this often (``liveness.unseen_grace`` is a minute at least).
SIGHTINGS_FLUSH_S = 10.0
MAINTENANCE_S = 30.0


class Revocation:
    """Due revocation jobs until none is due (``RevocationWorker.drain``; a kick during a
    run makes the tick run once more after it)."""

    def __init__(self, worker: RevocationWorker) -> None:
        self._worker = worker

    async def run_once(self) -> None:
        await self._worker.drain()


class SightingsFlush:
    """Writes the instances seen since the last flush. A failure is a warning: the
    sightings stay pending and the next flush writes them."""

    def __init__(self, sightings: Sightings, ledger: SightingRecords, clock: Clock) -> None:
        self._sightings = sightings
        self._ledger = ledger
        self._clock = clock

    async def run_once(self) -> None:
        try:
            await self._sightings.flush(self._ledger, self._clock.now())
        except BrokerError:
            log.warning("could not record instance sightings; retrying at the next flush")


class Reconciliation:
    """A reconciliation pass, from the tick or the admin API: sightings are flushed first,
    since the pass judges instances by when they were last seen."""

    def __init__(self, reconciler: Reconciler, flush: SightingsFlush, metrics: Metrics) -> None:
        self._reconciler = reconciler
        self._flush = flush
        self._metrics = metrics

    async def __call__(self, revoke_orphans: bool | None = None) -> ReconcileReport:
        await self._flush.run_once()
        report = await self._reconciler.run_once(revoke_orphans=revoke_orphans)
        self._metrics.observe_reconcile(report)
        return report

    async def run_once(self) -> None:
        await self()


class Maintenance:
    """Small upkeep, each step independent: one failing does not skip the others."""

    def __init__(
        self,
        vault: VaultClient,
        tokens: InstanceTokens,
        replay: ReplayRecords,
        worker: RevocationWorker,
        verifier: IdentityVerifier,
    ) -> None:
        self._vault = vault
        self._tokens = tokens
        self._replay = replay
        self._worker = worker
        self._verifier = verifier

    async def run_once(self) -> None:
        steps: tuple[tuple[str, Callable[[], Awaitable[object]]], ...] = (
            ("vault login", self._vault.maintain_login),
            ("instance tokens", self._prune_tokens),
            ("replay records", self._prune_replay),
            ("replaced leases", self._worker.sweep_superseded),
            ("jwks", self._refresh_jwks),
        )
        for name, step in steps:
            try:
                await step()
            except Exception:  # noqa: BLE001 — the next run retries the step
                log.exception("maintenance step failed", extra={"step": name})

    async def _prune_tokens(self) -> None:
        self._tokens.prune()

    async def _prune_replay(self) -> None:
        await self._replay.prune_seen_tokens(grace=REPLAY_PRUNE_GRACE)

    async def _refresh_jwks(self) -> None:
        await asyncio.gather(*(c.refresh_if_stale() for c in self._verifier.caches))
