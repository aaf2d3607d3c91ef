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
from broker.config import MAX_LEEWAY_SECONDS, Settings
from broker.errors import ConfigError
from broker.identity import IdentityVerifier
from broker.issuance import CredentialService
from broker.issuance.tokens import InstanceTokens
from broker.leases.store import Store
from broker.revocation.worker import RevocationWorker
from broker.vault import VaultClient

if TYPE_CHECKING:
    from broker.cloud.aws import AwsClient

log = logging.getLogger(__name__)
# A used token id is kept this long past its token's expiry: the leeway, plus the time a
# request may spend between verifying a token and recording it, plus clock skew between
# replicas (each prunes by its own clock).
REPLAY_PRUNE_GRACE = timedelta(seconds=MAX_LEEWAY_SECONDS + 600)
# Identity tokens up to 64 KiB travel in a header; aiohttp's default limit is 8 KiB.
MAX_HEADER_BYTES = 72 * 1024


class Broker:
    def __init__(
        self, settings: Settings, *, clock: Clock | None = None, worker_id: str | None = None
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.store = Store(settings.store, self.clock)
        self.vault = VaultClient(settings.vault, self.clock)
        self.metrics = Metrics()
        self.tokens = InstanceTokens(self.vault, self.store, self.clock)
        self.aws: AwsClient | None = None
        if settings.aws is not None:
            from broker.cloud.aws import AwsClient  # boto3 loads only where AWS is used

            self.aws = AwsClient(settings.aws, self.clock)
        self.worker = RevocationWorker(
            settings.revocation,
            self.store,
            self.vault,
            self.clock,
            on_terminated=self.tokens.forget,
            worker_id=worker_id,
            cloud=self.aws,
        )
        self._http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._scheduler: AsyncIOScheduler | None = None
        self.url: str | None = None
        self.verifier: IdentityVerifier | None = None

    async def start(self, *, require_migrated: bool = True) -> None:
        await self.store.start()
        if require_migrated and not await self.store.is_migrated():
            await self.store.close()
            raise ConfigError(
                "the lease store is not migrated to this version: "
                "run `broker migrate --config FILE` first"
            )
        await self.vault.start()
        if self.aws is not None:
            await self.aws.start()
        self._http = aiohttp.ClientSession()
        self.verifier = IdentityVerifier(self.settings.identity, self._http, self.clock)
        service = CredentialService(
            roles=self.settings.roles,
            rules=self.settings.policy.rules,
            store=self.store,
            vault=self.vault,
            tokens=self.tokens,
            clock=self.clock,
            deadline_s=self.settings.revocation.issuing_timeout_s / 2,
            cloud=self.aws,
        )
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        rev = self.settings.revocation
        self._scheduler.add_job(
            self._tick_revocation,
            "interval",
            seconds=rev.tick_s,
            id="revocation",
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
        )
        self._scheduler.add_job(
            self._tick_maintenance,
            "interval",
            seconds=30,
            id="maintenance",
            max_instances=1,
            coalesce=True,
        )
        deps = ApiDeps(
            verifier=self.verifier,
            service=service,
            store=self.store,
            vault=self.vault,
            metrics=self.metrics,
            admin_token_sha256=self.settings.admin.token_sha256,
            max_body_bytes=self.settings.server.max_body_bytes,
            kick_revocation=self.kick_revocation,
            forget_instance=self.tokens.forget,
            roles=self.settings.roles,
            rules=self.settings.policy.rules,
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

    def kick_revocation(self) -> None:
        if self._scheduler is not None:
            job = self._scheduler.get_job("revocation")
            if job is not None:
                job.modify(next_run_time=datetime.now(UTC))

    async def _tick_revocation(self) -> None:
        try:
            while await self.worker.run_once():
                pass
        except Exception:  # noqa: BLE001 — a tick logs and carries on
            log.exception("revocation tick failed")

    async def _tick_maintenance(self) -> None:
        assert self.verifier is not None
        verifier = self.verifier
        steps: tuple[tuple[str, Callable[[], Awaitable[Any]]], ...] = (
            ("vault login", self.vault.maintain_login),
            ("instance tokens", self._prune_tokens),
            ("replay records", lambda: self.store.prune_seen_tokens(grace=REPLAY_PRUNE_GRACE)),
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
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._http is not None:
            await self._http.close()
            self._http = None
        await self.vault.close()
        if self.aws is not None:
            await self.aws.close()
        await self.store.close()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self.start()
            await stop.wait()
        finally:
            await self.stop()
