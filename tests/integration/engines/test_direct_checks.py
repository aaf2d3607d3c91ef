"""Direct checks against the real thing: a certificate OpenBao's PKI issued is not on the
CRL until it is revoked, and then is; a PostgreSQL role is there until it is dropped. The
broker asks with its own token (the CRL needs no policy) and with a read-only login."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import psycopg
import pytest
from pydantic import SecretStr

from broker.clock import SystemClock
from broker.dev.openbao import OpenBaoDevServer
from broker.engines.checks import DirectChecks
from broker.engines.role import RoleSettings
from broker.vault.bootstrap import DevVault
from broker.vault.client import VaultClient
from broker.vault.settings import TokenAuth, VaultSettings
from tests.harness.postgres import PgServer
from tests.harness.vault import VaultProbe


@dataclass(frozen=True)
class Lease:
    lease_id: str
    role: str
    vault_path: str | None
    credential_ref: dict[str, str] | None


CHECKER_PASSWORD = "checker-pw-" + uuid.uuid4().hex[:8]


@pytest.fixture
def checker(pg: PgServer) -> object:
    """A login that can do nothing but connect and read the catalogue (pg_roles is
    readable by every role)."""
    name = f"checker_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE \"{name}\" LOGIN PASSWORD '{CHECKER_PASSWORD}' "
                     "NOSUPERUSER NOCREATEDB NOCREATEROLE")
    yield name
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute(f'DROP ROLE IF EXISTS "{name}"')


@pytest.fixture
async def client(bao: OpenBaoDevServer, vault_setup: DevVault) -> object:
    settings = VaultSettings(addr=bao.addr,
                             auth=TokenAuth(token=SecretStr(vault_setup.broker_token)))
    vault = VaultClient(settings, SystemClock())
    await vault.start()
    yield vault
    await vault.close()


def roles(pg: PgServer, checker: str) -> dict[str, RoleSettings]:
    return {
        "dev-cert": RoleSettings(engine="pki", mount="pki", vault_role="dev-cert",
                                 params={"common_name": "{workload}.workload.internal"}),
        "dev-db": RoleSettings(engine="database", mount="database", vault_role="dev-db",
                               check={"url": pg.url("postgres", user=checker),
                                      "password": CHECKER_PASSWORD, "timeout_s": 5}),
    }


async def test_a_revoked_certificate_is_gone_an_unrevoked_one_is_not(
        vault: VaultProbe, vault_setup: DevVault, pg: PgServer, checker: str,
        client: VaultClient) -> None:
    checks = DirectChecks(roles(pg, checker), client)
    leases = []
    for _ in range(2):
        status, body = vault.call("POST", "pki/issue/dev-cert",
                                  {"common_name": f"c-{uuid.uuid4().hex[:8]}.workload.internal",
                                   "ttl": "10m"})
        assert status == 200, body
        leases.append(Lease(body["lease_id"], "dev-cert", "pki/issue/dev-cert",
                            {"serial_number": body["data"]["serial_number"]}))
    kept, revoked = leases
    status, body = vault.call("POST", "pki/revoke",
                              {"serial_number": revoked.credential_ref["serial_number"]})
    assert status == 200, body

    assert await checks.gone(revoked) is True
    assert await checks.gone(kept) is False
    # Vault's "aa:bb" form or an operator's "AA-BB": the same serial
    upper = Lease(revoked.lease_id, "dev-cert", "pki/issue/dev-cert",
                  {"serial_number": revoked.credential_ref["serial_number"].upper()
                   .replace(":", "-")})
    assert await checks.gone(upper) is True
    # A mount that is no PKI: the check cannot tell, and says so rather than guess.
    elsewhere = Lease(kept.lease_id, "dev-cert", "nosuchmount/issue/dev-cert",
                      kept.credential_ref)
    assert await checks.gone(elsewhere) is None
    vault.call("PUT", "sys/leases/revoke", {"lease_id": kept.lease_id})


async def test_a_database_role_that_exists_is_not_gone_a_dropped_one_is(
        pg: PgServer, checker: str, client: VaultClient,
        caplog: pytest.LogCaptureFixture) -> None:
    checks = DirectChecks(roles(pg, checker), client)
    name = f"v-lost-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{name}" LOGIN')
    lease = Lease("database/creds/dev-db/x", "dev-db", "database/creds/dev-db",
                  {"username": name})
    try:
        assert await checks.gone(lease) is False
    finally:
        with psycopg.connect(pg.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{name}"')
    assert await checks.gone(lease) is True
    assert CHECKER_PASSWORD not in caplog.text


async def test_an_unreachable_checker_cannot_tell(pg: PgServer, checker: str,
                                                  client: VaultClient,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    from broker.dev.openbao import free_port
    role = RoleSettings(engine="database", mount="database", vault_role="dev-db",
                        check={"url": f"postgresql://{checker}@127.0.0.1:{free_port()}/postgres",
                               "password": CHECKER_PASSWORD, "timeout_s": 2})
    checks = DirectChecks({"dev-db": role}, client)
    lease = Lease("database/creds/dev-db/y", "dev-db", "database/creds/dev-db",
                  {"username": "postgres"})
    assert await checks.gone(lease) is None
    assert "cannot ask PostgreSQL" in caplog.text
    assert CHECKER_PASSWORD not in caplog.text
