"""The running broker: starts the assembled components in order, then supervises them.

``start`` does the I/O (the serving certificate, the lease database and its migration
check, Vault, AWS, the Kubernetes client and liveness checks, binding the HTTP server) and
registers, as it goes, what must be closed, so a start that fails half way closes exactly
what it opened. The supervisor then runs the parts (the HTTP server, the termination
sources, each restarted with backoff) and the ticks until ``stop``, or until a part fails
for good.
"""

from __future__ import annotations

import asyncio
import logging

from broker.app.assemble import Assembly
from broker.app.supervisor import Backoff, Part, Restarting, Supervisor
from broker.errors import ConfigError

log = logging.getLogger(__name__)


class Broker:
    """``components`` is what ``assemble`` built; ``backoff`` is how a termination source
    that dies is restarted (after ``give_up_after`` quick failures the broker stops)."""

    def __init__(self, components: Assembly, *, backoff: Backoff | None = None) -> None:
        self.components = components
        self._backoff = backoff or Backoff()
        self._supervisor = Supervisor()
        self._stop = asyncio.Event()
        self._running: asyncio.Task[None] | None = None
        self.url: str | None = None

    async def start(self) -> None:
        c, close_later = self.components, self._supervisor.on_close
        close_later(c.http.close)
        c.server.load_certificate()  # a bad pair stops start-up before anything is opened
        c.server.claim_address()  # so does a port in use
        close_later(c.server.close)  # frees the address if start-up stops before serving
        database = c.ledgers.database
        await database.start()
        close_later(database.close)
        if not await database.is_migrated():
            await self._supervisor.close()
            raise ConfigError(
                "the lease store is not migrated to this version: "
                "run `broker migrate --config FILE` first"
            )
        close_later(c.vault.close)  # also when its start-up check refuses the token
        if c.direct_checks is not None:
            close_later(c.direct_checks.close)  # its idle checker connections
        await c.vault.start()
        await c.signing.start()  # a file key that does not load stops start-up
        if c.aws is not None:
            await c.aws.start()
            close_later(c.aws.close)
        if c.kubernetes is not None:
            await c.kubernetes.start()
            close_later(c.kubernetes.close)
        for check in c.liveness.values():
            await check.start()
            close_later(check.close)
        for source in c.sources:
            close_later(source.close)
        # Closed first: the last sightings, and the refusals counted in the minute that has
        # not closed yet, are written while the database is still open.
        close_later(c.flush_sightings.run_once)
        close_later(c.refusals.flush_all)
        self.url = await c.server.bind()
        close_later(c.server.close)  # a no-op once the server part has stopped
        parts: list[Part] = [c.server]
        parts += [
            Restarting(source, self._backoff, on_restart=c.metrics.source_restarted)
            for source in c.sources
        ]
        self._running = asyncio.create_task(
            self._supervisor.run(parts, c.ticks.all(), self._stop), name="supervisor"
        )
        log.info("broker started", extra={"url": self.url})

    async def stop(self) -> None:
        """Stop everything and close what was opened. A part's failure was logged by the
        supervisor; ``run`` is the one that raises it."""
        self._stop.set()
        if self._running is None:
            await self._supervisor.close()
        else:
            await asyncio.gather(self._running, return_exceptions=True)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; raise the failure of a part that stopped the
        broker (so that ``broker serve`` exits non-zero)."""
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        assert self._running is not None
        asked = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({asked, self._running}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            asked.cancel()
            self._stop.set()
        await self._running
