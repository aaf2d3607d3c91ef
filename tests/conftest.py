"""Shared fixtures: a real OpenBao dev server, a real PostgreSQL, the dev issuer serving its
JWKS over HTTP on loopback, and brokers started in-process on a free loopback port."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import settings as hypothesis_settings
from sqlalchemy import create_engine, text

from broker.app import Broker, assemble
from broker.config import Settings, load_settings
from broker.dev.environment import dev_settings_dict
from broker.dev.issuer import DevIssuer
from broker.dev.openbao import OpenBaoDevServer
from broker.leases.migrations import migrate, sync_url
from broker.vault.bootstrap import DevVault, bootstrap_dev
from tests.harness.ports import held_socket, port_of, serve_app, started_openbao
from tests.harness.postgres import PgServer, find_or_start_postgres
from tests.harness.services import STRICT_ENV, strict
from tests.harness.vault import VaultProbe

ADMIN_TOKEN = "adm-" + secrets.token_urlsafe(24)

# No per-example deadline: two cores shared with other work make one example's time a
# measure of the machine, not of the code (a 290 ms `sh` round trip failed a 200 ms
# deadline). Example counts stay Hypothesis' own.
hypothesis_settings.register_profile("shared-cores", deadline=None)
hypothesis_settings.load_profile("shared-cores")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Under BROKER_TESTS_REQUIRE_SERVICES=1 (CI) no test may skip: a skip there means
    something the suite should prove was not proved."""
    outcome = yield
    report = outcome.get_result()
    if strict() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under {STRICT_ENV}=1: {report.longrepr}"
ADMIN_SHA = hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="broker-tests-") as d:
        os.chmod(d, 0o755)  # a throwaway PostgreSQL may run as another user
        yield Path(d)


@pytest.fixture(scope="session")
def pg(workdir: Path) -> Iterator[PgServer]:
    server = find_or_start_postgres(workdir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def bao(workdir: Path) -> Iterator[OpenBaoDevServer]:
    server = started_openbao(workdir / "openbao")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vault(bao: OpenBaoDevServer) -> VaultProbe:
    return VaultProbe(bao.addr, bao.root_token)


@pytest.fixture(scope="session")
def vault_setup(bao: OpenBaoDevServer, pg: PgServer, vault: VaultProbe) -> Iterator[DevVault]:
    yield bootstrap_dev(bao.addr, bao.root_token, postgres_url=pg.admin_url)
    # Leave no PostgreSQL login behind in a shared server: revoke whatever tests left.
    for prefix in ("database/creds/dev-db", "pki/issue/dev-cert"):
        vault.call("PUT", f"sys/leases/revoke-prefix/{prefix}", {"sync": True})


@pytest.fixture(scope="session")
async def issuer() -> AsyncIterator[DevIssuer]:
    sock = held_socket()
    dev = DevIssuer.generate(f"http://127.0.0.1:{port_of(sock)}")
    runner, _ = await serve_app(dev.app(), sock, access_log=None)
    yield dev
    await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@dataclass
class RunningBroker:
    broker: Broker
    settings: Settings
    store_url: str
    issuer: DevIssuer

    @property
    def url(self) -> str:
        assert self.broker.url
        return self.broker.url

    def token(self, instance: str, workload: str = "payments", **kw: Any) -> str:
        return self.issuer.mint(instance=instance, workload=workload, **kw)

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def rows(self, table: str) -> list[dict[str, Any]]:
        engine = create_engine(sync_url(self.store_url))
        try:
            with engine.connect() as conn:
                return [dict(r._mapping) for r in conn.execute(text(f"SELECT * FROM {table}"))]
        finally:
            engine.dispose()

    def store_snapshot(self) -> dict[str, int]:
        return {t: len(self.rows(t)) for t in ("instances", "instance_tokens", "leases",
                                                "revocation_jobs", "audit_events")}


def broker_settings(*, store_url: str, bao: OpenBaoDevServer, setup: DevVault,
                    issuer: DevIssuer, vault_addr: str | None = None,
                    overrides: dict[str, Any] | None = None,
                    extra_roles: dict[str, dict[str, Any]] | None = None,
                    instance_policies: tuple[str, ...] = (),
                    issuer_overrides: dict[str, Any] | None = None) -> Settings:
    """The dev settings on the test Vault. ``extra_roles`` are added to the dev roles and
    allowed to every dev workload; ``instance_policies`` (named ``broker-instance-*``) are
    given to instance tokens on top of ``broker-instance``."""
    data = dev_settings_dict(
        vault_addr=vault_addr or bao.addr, broker_token=setup.broker_token, issuer=issuer.issuer,
        jwks_uri=f"{issuer.issuer}/.well-known/jwks.json", store_url=store_url,
        admin_token_sha256=ADMIN_SHA, with_database=setup.database_configured, port=0)
    # Tests issue many credentials per instance; the lease-limit tests set their own.
    for role in data["roles"].values():
        role["max_leases_per_instance"] = 100
    if extra_roles:
        data["roles"].update(extra_roles)
        data["policy"]["rules"][0]["allow"] = sorted(data["roles"])
    if instance_policies:
        data["vault"]["instance_policies"] = ["broker-instance", *instance_policies]
    data["revocation"] = {"tick_s": 0.2, "backoff_base_s": 0.2, "backoff_max_s": 2.0,
                          "claim_timeout_s": 5, "issuing_timeout_s": 5}
    data["identity"]["issuers"][0].update(issuer_overrides or {})
    for key, value in (overrides or {}).items():
        data[key] = value
    return load_settings(data, source="test")


@pytest.fixture
async def make_broker(workdir: Path, pg: PgServer, bao: OpenBaoDevServer,
                      vault_setup: DevVault, issuer: DevIssuer,
                      ) -> AsyncIterator[Callable[..., Awaitable[RunningBroker]]]:
    started: list[Broker] = []
    databases: list[str] = []

    async def make(store: str = "postgresql", store_url: str | None = None,
                   clock: Any = None, checks: Any = "direct", **kw: Any) -> RunningBroker:
        """A started broker on a fresh store. ``checks`` as ``broker serve`` runs them
        ("direct": the PKI CRL, PostgreSQL roles with a checker) unless a test says
        otherwise (None: no direct check, every lease Vault forgot is lost)."""
        if store_url is not None:
            pass
        elif store == "sqlite":
            store_url = f"sqlite:///{workdir / ('store-' + secrets.token_hex(6) + '.db')}"
        else:
            name = await asyncio.to_thread(pg.create_database)
            databases.append(name)
            store_url = pg.url(name)
        await asyncio.to_thread(migrate, store_url)
        settings = broker_settings(store_url=store_url, bao=bao, setup=vault_setup,
                                   issuer=issuer, **kw)
        broker = Broker(assemble(settings, clock=clock, checks=checks))
        try:
            await broker.start()
        except BaseException:
            await broker.stop()
            raise
        started.append(broker)
        return RunningBroker(broker, settings, store_url, issuer)

    yield make
    for b in started:
        await b.stop()
    for name in databases:
        await asyncio.to_thread(pg.drop_database, name)


@pytest.fixture
async def broker(make_broker: Callable[..., Awaitable[RunningBroker]]) -> RunningBroker:
    return await make_broker()
