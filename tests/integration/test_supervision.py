"""A broker supervises its termination sources: one that dies is restarted with backoff
(counted in ``broker_termination_events{outcome="restarted"}``), and one that keeps dying
stops the broker with its error, so that ``broker serve`` exits non-zero."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from broker.app import Broker, assemble
from broker.app.supervisor import Backoff
from broker.config import Settings
from broker.dev.issuer import DevIssuer
from broker.dev.openbao import OpenBaoDevServer
from broker.leases.migrations import migrate
from broker.vault.bootstrap import DevVault
from tests.conftest import broker_settings

WAIT_S = 60.0  # only ever reached when a test is broken
QUICK = Backoff(first_s=0.01, max_s=0.01, give_up_after=3)


class Source:
    """A termination source whose first ``failures`` runs raise; later runs wait."""

    name = "test-source"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.runs = 0
        self.healthy = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        self.runs += 1
        if self.runs <= self.failures:
            raise RuntimeError("the source broke")
        self.healthy.set()
        await stop.wait()

    def counts(self) -> dict[str, int]:
        return {}

    async def close(self) -> None:
        pass


@pytest.fixture
async def settings(workdir: Path, bao: OpenBaoDevServer, vault_setup: DevVault,
                   issuer: DevIssuer) -> Settings:
    store_url = f"sqlite:///{workdir / ('store-' + secrets.token_hex(6) + '.db')}"
    await asyncio.to_thread(migrate, store_url)
    return broker_settings(store_url=store_url, bao=bao, setup=vault_setup, issuer=issuer)


async def test_a_source_that_dies_is_restarted_and_the_broker_keeps_serving(
        settings: Settings, http: aiohttp.ClientSession) -> None:
    source = Source(failures=2)
    broker = Broker(replace(assemble(settings), sources=(source,)), backoff=QUICK)
    stop = asyncio.Event()
    running = asyncio.create_task(broker.run(stop))
    try:
        await asyncio.wait_for(source.healthy.wait(), WAIT_S)
        assert source.runs == 3
        async with http.get(f"{broker.url}/metrics") as resp:
            text = await resp.text()
        assert ('broker_termination_events{outcome="restarted",source="test-source"} 2.0'
                in text)
    finally:
        stop.set()
        await asyncio.wait_for(running, WAIT_S)  # a clean stop raises nothing


async def test_a_source_that_keeps_dying_stops_the_broker_with_its_error(
        settings: Settings, http: aiohttp.ClientSession) -> None:
    source = Source(failures=1000)
    broker = Broker(replace(assemble(settings), sources=(source,)), backoff=QUICK)
    with pytest.raises(RuntimeError, match="the source broke"):
        await asyncio.wait_for(broker.run(asyncio.Event()), WAIT_S)
    assert source.runs == QUICK.give_up_after
    with pytest.raises(aiohttp.ClientConnectionError):  # the server stopped with it
        async with http.get(f"{broker.url}/healthz"):
            pass
