"""Builds the broker from ``Settings`` and runs its parts together.

Parts: the HTTP server, and APScheduler ticks for revocation, JWKS refresh, the broker's
own Vault login and the instance-token cache; with an ``aws`` section, the AWS client
(STS exchanges on issuance, IAM denies on termination). Work done by ticks is claimed from
the store, so the same tick on several replicas is safe. A tick logs its error and carries
on.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from broker.api.app import ApiDeps, build_app
from broker.api.metrics import Metrics
from broker.clock import Clock, SystemClock
from broker.config import Settings
from broker.errors import BrokerError, ConfigError
from broker.events import TerminationSource
from broker.identity import IdentityVerifier
from broker.identity.settings import MAX_LEEWAY_SECONDS
from broker.issuance import CredentialService
from broker.issuance.tokens import InstanceTokens
from broker.leases import (
    AdminRecords,
    Database,
    IssuanceRecords,
    JobState,
    JobView,
    ReconcileRecords,
    ReplayRecords,
    RevocationJobRecords,
    SightingRecords,
    TerminationRecords,
)
from broker.liveness import LivenessCheck
from broker.liveness.sightings import Sightings
from broker.revocation.reconcile import Reconciler, ReconcileReport
from broker.revocation.worker import RevocationWorker
from broker.vault import VaultClient

if TYPE_CHECKING:
    from broker.aws.client import AwsClient

log = logging.getLogger(__name__)
# A used token id is kept this long past its token's expiry: the leeway, plus the time a
# request may spend between verifying a token and recording it, plus clock skew between
# replicas (each prunes by its own clock).
REPLAY_PRUNE_GRACE = timedelta(seconds=MAX_LEEWAY_SECONDS + 600)
# Sightings are written this often (``liveness.unseen_grace`` is a minute at least).
SIGHTINGS_FLUSH_S = 10.0
# A termination source gets this long to finish the event in hand when the broker stops.
SOURCE_STOP_S = 5.0
# Identity tokens up to 64 KiB travel in a header; aiohttp's default limit is 8 KiB.
MAX_HEADER_BYTES = 72 * 1024


class Broker:
    def __init__(
        self, settings: Settings, *, clock: Clock | None = None, worker_id: str | None = None
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        # One database; each part gets only its own ledger on it.
        self.database = Database(settings.store)
        self.issuance_records = IssuanceRecords(self.database, self.clock)
        self.termination_records = TerminationRecords(self.database, self.clock)
        self.job_records = RevocationJobRecords(self.database, self.clock)
        self.reconcile_records = ReconcileRecords(self.database, self.clock)
        self.replay_records = ReplayRecords(self.database, self.clock)
        self.sighting_records = SightingRecords(self.database)
        self.admin_records = AdminRecords(self.database, self.clock)
        self.vault = VaultClient(settings.vault, self.clock)
        self.metrics = Metrics({name: role.engine for name, role in settings.roles.items()})
        self.tokens = InstanceTokens(self.vault, self.issuance_records, self.clock)
        self.aws: AwsClient | None = None
        if settings.aws is not None:
            from broker.aws.client import AwsClient  # boto3 loads only where AWS is used

            self.aws = AwsClient(settings.aws, self.clock)
        self.worker = RevocationWorker(
            settings.revocation,
            self.job_records,
            self.vault,
            self.clock,
            on_terminated=self.tokens.forget,
            worker_id=worker_id,
            cloud=self.aws,
        )
        self.sightings = Sightings()
        self._revocation_running = False
        self._revocation_kicked = False
        self.reconciler = Reconciler(
            settings.reconcile,
            settings.revocation,
            roles=settings.roles,
            issuers=settings.identity.issuers,
            store=self.reconcile_records,
            vault=self.vault,
            clock=self.clock,
            terminate=self.terminate,
        )
        self.liveness: dict[str, LivenessCheck] = {}
        self.sources: list[TerminationSource] = []
        self._source_tasks: list[asyncio.Task[None]] = []
        self._stop_sources = asyncio.Event()
        self._closers: list[Callable[[], Awaitable[Any]]] = []
        self.service: CredentialService | None = None
        self._http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._scheduler: AsyncIOScheduler | None = None
        self.url: str | None = None
        self.verifier: IdentityVerifier | None = None

    async def start(self, *, require_migrated: bool = True) -> None:
        await self.database.start()
        if require_migrated and not await self.database.is_migrated():
            await self.database.close()
            raise ConfigError(
                "the lease store is not migrated to this version: "
                "run `broker migrate --config FILE` first"
            )
        await self.vault.start()
        if self.aws is not None:
            await self.aws.start()
        self._http = aiohttp.ClientSession()
        self.verifier = IdentityVerifier(self.settings.identity, self._http, self.clock)
        await self._start_liveness_and_sources()
        self.service = service = CredentialService(
            roles=self.settings.roles,
            rules=self.settings.policy.rules,
            ledger=self.issuance_records,
            vault=self.vault,
            tokens=self.tokens,
            clock=self.clock,
            deadline_s=self.settings.revocation.issuing_timeout_s / 2,
            cloud=self.aws,
            liveness=self.liveness,
            terminate=self.terminate,
            sightings=self.sightings,
        )
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        ticks: tuple[tuple[str, Callable[[], Awaitable[Any]], float, bool], ...] = (
            # (id, tick, every seconds, run at once)
            ("revocation", self._tick_revocation, self.settings.revocation.tick_s, True),
            ("reconcile", self._tick_reconcile, self.settings.reconcile.tick_s, False),
            ("sightings", self._flush_sightings, SIGHTINGS_FLUSH_S, False),
            ("maintenance", self._tick_maintenance, 30, False),
        )
        for tick_id, tick, every, at_once in ticks:
            self._scheduler.add_job(
                tick,
                "interval",
                seconds=every,
                id=tick_id,
                max_instances=1,
                coalesce=True,
                **({"next_run_time": datetime.now(UTC)} if at_once else {}),
            )
        deps = ApiDeps(
            verifier=self.verifier,
            service=service,
            admin=self.admin_records,
            replay=self.replay_records,
            counts=self.admin_records,
            database=self.database,
            vault=self.vault,
            metrics=self.metrics,
            admin_token_sha256=self.settings.admin.token_sha256,
            max_body_bytes=self.settings.server.max_body_bytes,
            terminate=self.terminate,
            reconcile=self.reconcile,
            roles=self.settings.roles,
            rules=self.settings.policy.rules,
            clock=self.clock,
            issuer_names=frozenset(i.name for i in self.settings.identity.issuers),
            webhook=self.settings.events.webhook,
            sources=self.sources,
            liveness_outcomes=service.liveness_outcomes,
            worker=self.worker,
        )
        app = build_app(deps)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=False,
            max_field_size=MAX_HEADER_BYTES,
            max_line_size=16 * 1024,
        )
        await self._runner.setup()
        srv = self.settings.server
        sock = socket.socket(socket.AF_INET6 if ":" in srv.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((srv.host, srv.port))
        site = web.SockSite(self._runner, sock)
        await site.start()
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        self._scheduler.start()
        log.info("broker started", extra={"url": self.url})

    async def terminate(
        self, instance_id: str, *, actor: str, issuer: str | None = None
    ) -> JobView:
        """Every termination source ends here (``broker.events.Terminate``): the durable
        job first, then this replica forgets the instance's token and wakes its worker."""
        job = await self.termination_records.request_termination(
            instance_id, actor=actor, issuer=issuer
        )
        self.tokens.forget(instance_id)
        if job.state in (JobState.PENDING, JobState.RUNNING):
            self.kick_revocation()
        return job

    def kick_revocation(self) -> None:
        """Look for due jobs now: at once if no tick is running, else once more when the
        running tick has emptied its batch (no second tick is scheduled behind it)."""
        if self._revocation_running:
            self._revocation_kicked = True
            return
        if self._scheduler is not None:
            job = self._scheduler.get_job("revocation")
            if job is not None:
                job.modify(next_run_time=datetime.now(UTC))

    async def _start_liveness_and_sources(self) -> None:
        """Liveness checks (per issuer) and termination sources, from the settings. Their
        modules load only when configured (boto3, the Kubernetes client)."""
        settings = self.settings
        kube_client = None
        if settings.kubernetes is not None:
            from broker.kubernetes.client import KubernetesClient

            kube_client = KubernetesClient(settings.kubernetes)
            await kube_client.start()
            self._closers.append(kube_client.close)
        for issuer in settings.identity.issuers:
            check: LivenessCheck | None = None
            if issuer.liveness.check == "kubernetes":
                from broker.liveness.kubernetes import KubernetesLiveness

                assert kube_client is not None  # configuration validation requires it
                check = KubernetesLiveness(kube_client, cache_s=issuer.liveness.cache_s)
            elif issuer.liveness.check == "aws_ec2":
                from broker.liveness.ec2 import Ec2Liveness

                assert settings.aws is not None
                check = Ec2Liveness(settings.aws, self.clock, cache_s=issuer.liveness.cache_s)
            if check is not None:
                await check.start()
                self._closers.append(check.close)
                self.liveness[issuer.name] = check
        if settings.events.sqs is not None:
            from broker.events.sqs import SqsTerminationSource

            sqs = SqsTerminationSource(settings.events.sqs, self.terminate)
            self._closers.append(sqs.close)
            self.sources.append(sqs)
        if settings.kubernetes is not None and settings.kubernetes.watch:
            from broker.events.pod_watch import PodWatch

            issuer_name = settings.kubernetes.issuer
            known = (
                (lambda: self.termination_records.active_instance_ids(issuer_name))
                if issuer_name is not None
                else None
            )
            self.sources.append(PodWatch(settings.kubernetes, kube_client, self.terminate, known))
        self._stop_sources.clear()
        for source in self.sources:
            task = asyncio.create_task(self._run_source(source), name=f"source:{source.name}")
            self._source_tasks.append(task)

    async def _run_source(self, source: TerminationSource) -> None:
        try:
            await source.run(self._stop_sources)
        except Exception:  # noqa: BLE001 — a source's own loop retries; this is a bug
            log.exception("termination source stopped", extra={"source": source.name})

    async def reconcile(self, revoke_orphans: bool | None = None) -> ReconcileReport:
        await self._flush_sightings()
        report = await self.reconciler.run_once(revoke_orphans=revoke_orphans)
        self.metrics.observe_reconcile(report)
        return report

    async def _tick_reconcile(self) -> None:
        try:
            await self.reconcile()
        except Exception:  # noqa: BLE001 — a tick logs and carries on
            log.exception("reconcile tick failed")

    async def _flush_sightings(self) -> None:
        try:
            await self.sightings.flush(self.sighting_records, self.clock.now())
        except BrokerError:
            log.warning("could not record instance sightings; retrying at the next flush")

    async def _tick_revocation(self) -> None:
        self._revocation_running = True
        try:
            while True:
                self._revocation_kicked = False
                if not await self.worker.run_once() and not self._revocation_kicked:
                    break
        except Exception:  # noqa: BLE001 — a tick logs and carries on
            log.exception("revocation tick failed")
        finally:
            self._revocation_running = False

    async def _tick_maintenance(self) -> None:
        assert self.verifier is not None
        verifier = self.verifier
        steps: tuple[tuple[str, Callable[[], Awaitable[Any]]], ...] = (
            ("vault login", self.vault.maintain_login),
            ("instance tokens", self._prune_tokens),
            (
                "replay records",
                lambda: self.replay_records.prune_seen_tokens(grace=REPLAY_PRUNE_GRACE),
            ),
            ("replaced leases", self.worker.sweep_superseded),
            ("jwks", lambda: asyncio.gather(*(c.refresh_if_stale() for c in verifier.caches))),
        )
        for name, step in steps:  # one failing step does not skip the others
            try:
                await step()
            except Exception:  # noqa: BLE001
                log.exception("maintenance step failed", extra={"step": name})

    async def _prune_tokens(self) -> None:
        self.tokens.prune()

    async def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        self._stop_sources.set()
        if self._source_tasks:
            _, pending = await asyncio.wait(self._source_tasks, timeout=SOURCE_STOP_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self._source_tasks.clear()
        self.sources.clear()
        if self.service is not None:
            await self._flush_sightings()
        for close in reversed(self._closers):
            try:
                await close()
            except Exception:  # noqa: BLE001 — stopping goes on
                log.warning("a component did not close cleanly", exc_info=True)
        self._closers.clear()
        self.liveness.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._http is not None:
            await self._http.close()
            self._http = None
        await self.vault.close()
        if self.aws is not None:
            await self.aws.close()
        await self.database.close()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self.start()
            await stop.wait()
        finally:
            await self.stop()
