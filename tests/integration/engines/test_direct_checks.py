"""Direct checks against the real thing: a certificate OpenBao's PKI issued is not on the
CRL until it is revoked, and then is; a PostgreSQL role is there until it is dropped. The
broker asks with its own token (the CRL needs no policy) and with a read-only login."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import psycopg
import pytest
from pydantic import SecretStr, ValidationError

from broker.clock import SystemClock
from broker.dev.openbao import OpenBaoDevServer
from broker.engines.checks import DirectChecks, Verdict
from broker.engines.role import DatabaseCheck, RoleSettings
from broker.vault.bootstrap import DevVault
from broker.vault.client import VaultClient
from broker.vault.settings import TokenAuth, VaultSettings
from tests.harness.postgres import PgServer
from tests.harness.vault import VaultProbe
from tests.harness.wait import eventually


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

    assert await checks.gone(revoked) == Verdict(True, "crl")
    assert await checks.gone(kept) == Verdict(False, "crl")
    # Vault's "aa:bb" form or an operator's "AA-BB": the same serial
    upper = Lease(revoked.lease_id, "dev-cert", "pki/issue/dev-cert",
                  {"serial_number": revoked.credential_ref["serial_number"].upper()
                   .replace(":", "-")})
    assert (await checks.gone(upper)).gone is True
    # A mount that is no PKI: the check cannot tell, and says so rather than guess.
    elsewhere = Lease(kept.lease_id, "dev-cert", "nosuchmount/issue/dev-cert",
                      kept.credential_ref)
    assert (await checks.gone(elsewhere)).gone is None
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
        assert await checks.gone(lease) == Verdict(False, "database")
    finally:
        with psycopg.connect(pg.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{name}"')
    assert await checks.gone(lease) == Verdict(True, "database")
    assert CHECKER_PASSWORD not in caplog.text
    # both answers came over one connection, which close() ends
    assert checker_sessions(pg, checker) == 1
    await checks.close()
    await eventually(lambda: checker_sessions(pg, checker) == 0,
                     "the checker's connection is closed")


def checker_sessions(pg: PgServer, checker: str) -> int:
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                           (checker,)).fetchone()
    assert row is not None
    return int(row[0])


def db_lease(name: str) -> Lease:
    return Lease(f"database/creds/dev-db/{name}", "dev-db", "database/creds/dev-db",
                 {"username": name})


async def test_a_role_whose_name_differs_only_in_case_is_never_read_as_gone(
        pg: PgServer, checker: str, client: VaultClient) -> None:
    """A creation statement that leaves the name unquoted makes PostgreSQL fold it to lower
    case: Vault's "V-Lost-..." then exists as "v-lost-...". Looked up exactly it would read
    as dropped; any role of that name in another case keeps the lease still valid."""
    checks = DirectChecks(roles(pg, checker), client)
    suffix = uuid.uuid4().hex[:8]
    folded = f"v_lost_{suffix}"
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE V_Lost_{suffix} LOGIN")  # unquoted: folded
    try:
        assert await checks.gone(db_lease(f"V_Lost_{suffix}")) == Verdict(False, "database")
        assert await checks.gone(db_lease(folded)) == Verdict(False, "database")
        assert await checks.gone(db_lease(folded.upper())) == Verdict(False, "database")
    finally:
        with psycopg.connect(pg.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{folded}"')
    assert await checks.gone(db_lease(f"V_Lost_{suffix}")) == Verdict(True, "database")
    await checks.close()


async def test_a_checker_on_the_wrong_server_cannot_tell_with_a_control_role(
        pg: PgServer, checker: str, client: VaultClient,
        caplog: pytest.LogCaptureFixture) -> None:
    """check.expect_role names a role only the right server has (e.g. Vault's account):
    a server without it is not where the logins live, and every login would read gone."""
    def role(expect: str) -> dict[str, RoleSettings]:
        return {"dev-db": RoleSettings(
            engine="database", mount="database", vault_role="dev-db",
            check={"url": pg.url("postgres", user=checker) + "?application_name=broker-check",
                   "password": CHECKER_PASSWORD, "expect_role": expect})}

    gone = db_lease(f"v-never-{uuid.uuid4().hex[:8]}")
    wrong = DirectChecks(role(f"vault_absent_{uuid.uuid4().hex[:8]}"), client)
    assert await wrong.gone(gone) == Verdict(None, "database")
    assert "check.expect_role" in caplog.text
    right = DirectChecks(role(checker), client)
    assert await right.gone(gone) == Verdict(True, "database")
    assert await right.gone(db_lease(checker)) == Verdict(False, "database")
    await wrong.close()
    await right.close()


@pytest.mark.parametrize("query", ["host=127.0.0.1", "port=5432", "hostaddr=127.0.0.1",
                                   "password=x", "user=postgres"])
def test_a_checker_url_that_overrides_its_server_or_login_is_refused(
        pg: PgServer, checker: str, query: str) -> None:
    """The query string would win over the URL's own host, port or user, so the server
    logged as the checker would not be the one asked; a password there would be logged."""
    url = pg.url("postgres", user=checker) + "?" + query
    with pytest.raises(ValidationError, match="the URL's query sets"):
        RoleSettings(engine="database", mount="database", vault_role="dev-db",
                     check={"url": url, "password": CHECKER_PASSWORD})


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
    assert await checks.gone(lease) == Verdict(None, "database")
    assert "cannot ask PostgreSQL" in caplog.text
    assert CHECKER_PASSWORD not in caplog.text


async def test_the_checkers_connection_is_closed_once_idle(pg: PgServer, checker: str) -> None:
    from broker.engines.checks import PostgresRoleCheck
    check = PostgresRoleCheck(DatabaseCheck(url=pg.url("postgres", user=checker),
                                            password=CHECKER_PASSWORD), idle_s=0.3)
    name = f"v-idle-{uuid.uuid4().hex[:8]}"
    assert await check.gone(db_lease(name)) is True
    assert await check.gone(db_lease(checker)) is False
    await eventually(lambda: checker_sessions(pg, checker) == 0,
                     "the idle checker connection is closed")
    assert await check.gone(db_lease(name)) is True  # opened again when needed
    await check.close()


async def test_a_cancelled_answer_leaves_no_connection_behind(pg: PgServer,
                                                               checker: str) -> None:
    import asyncio

    from broker.engines.checks import PostgresRoleCheck
    check = PostgresRoleCheck(DatabaseCheck(url=pg.url("postgres", user=checker),
                                            password=CHECKER_PASSWORD))
    assert await check.gone(db_lease(checker)) is False  # the connection is open now
    asking = asyncio.create_task(check.gone(db_lease(checker)))
    await asyncio.sleep(0)
    asking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asking
    await eventually(lambda: checker_sessions(pg, checker) == 0,
                     "the cancelled answer's connection is closed")
    assert await check.gone(db_lease(checker)) is False  # a new one when asked again
    await check.close()
