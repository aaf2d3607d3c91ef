"""The database engine through the broker, on every database OpenBao mints logins for here:
PostgreSQL, MariaDB (mysql-database-plugin) and Redis (redis-database-plugin and
valkey-database-plugin, both speaking to Redis 7 and Valkey), each with a narrow Vault role.

One story, told once for every target: the login does what its role grants (reads the
orders), is refused everything else and nothing changes, and termination deletes it and
cuts the session it had open. What differs between databases (what the server holds for a
login, which statements are refused and with which exact error, how a cut session and a
refused login show) is in one class per database below, and the refusals are data.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import datetime
from typing import Any

import psycopg
import pymysql
import pytest
import redis
from psycopg import errors

from tests.harness.api import issue, release, terminate
from tests.harness.databases import (
    ORDERS,
    MariaDbTarget,
    PostgresTarget,
    RedisTarget,
    assert_nowhere_recorded,
    lifetime_s,
    mariadb_target,
    postgres_target,
    redis_target,
)
from tests.harness.wait import eventually

# --------------------------------------------------------------------------- PostgreSQL


class Postgres:
    """A PostgreSQL login: a role with CONNECT, USAGE on ``app`` and SELECT on
    ``app.orders``; PostgreSQL itself refuses its password after the lease's end."""

    role = "orders-reader"
    instance_tag = "pg"

    # (statement, SQLSTATE, message): every refusal is insufficient_privilege
    REFUSED = {
        "insert-orders": (
            "INSERT INTO app.orders VALUES (3, 'plum', 1)",
            "42501",
            "permission denied for table orders",
        ),
        "update-orders": (
            "UPDATE app.orders SET quantity = 0",
            "42501",
            "permission denied for table orders",
        ),
        "delete-orders": ("DELETE FROM app.orders", "42501", "permission denied for table orders"),
        "truncate-orders": ("TRUNCATE app.orders", "42501", "permission denied for table orders"),
        "select-customers": (
            "SELECT * FROM app.customers",
            "42501",
            "permission denied for table customers",
        ),
        "create-table-in-app": (
            "CREATE TABLE app.notes (x int)",
            "42501",
            "permission denied for schema app",
        ),
        "create-table-in-public": (
            "CREATE TABLE public.notes (x int)",
            "42501",
            "permission denied for schema public",
        ),
        "create-role": ("CREATE ROLE intruder", "42501", "permission denied to create role"),
    }

    def __init__(self, target: PostgresTarget) -> None:
        self.target = target
        self.side = target.side

    def check_login(self, user: str, password: str, cred: dict[str, Any]) -> None:
        assert user.startswith(self.target.login_prefix)
        assert 280 <= lifetime_s(cred) <= 300  # the 5m asked for, not the Vault role's 10m
        # PostgreSQL holds this very password, and refuses it after the lease's end: the
        # broker's TTL reached the database (VALID UNTIL), not only Vault's lease.
        assert self.target.password_matches(user, password)
        assert not self.target.password_matches(user, password + "x")
        valid_until = self.target.valid_until(user)
        assert valid_until is not None
        assert abs((valid_until - datetime.fromisoformat(cred["expires_at"])).total_seconds()) < 5

    def use(self, user: str, password: str) -> psycopg.Connection:
        session = self.target.connect(user, password)
        assert session.execute("SELECT current_user, current_database()").fetchone() == (
            user,
            self.target.database,
        )
        assert self._orders(session) == list(ORDERS)
        return session

    @staticmethod
    def _orders(session: psycopg.Connection) -> list[tuple[Any, ...]]:
        return session.execute("SELECT id, item, quantity FROM app.orders ORDER BY id").fetchall()

    def login_exists(self, user: str) -> bool:
        return self.target.role_exists(user)

    def session_ended(self, user: str, session: psycopg.Connection) -> Callable[[], bool]:
        # By pid, taken while the session is up: a dropped role's sessions have no name.
        pid = session.info.backend_pid
        return lambda: not self.target.backend_alive(pid)

    def assert_session_cut(self, session: psycopg.Connection) -> None:
        # Ended, not left to run as a dropped role.
        with pytest.raises(psycopg.OperationalError):
            session.execute("SELECT 1")
        session.close()

    def assert_login_refused(self, user: str, password: str) -> None:
        with pytest.raises(psycopg.OperationalError) as refused:
            self.target.connect(user, password)
        # The test servers trust loopback logins, so the refusal is the missing role; on a
        # server that checks passwords it is the failed password.
        assert any(
            why in str(refused.value)
            for why in (f'role "{user}" does not exist', f'authentication failed for user "{user}"')
        ), str(refused.value)

    def assert_refused(self, user: str, password: str, refusal: tuple[str, str, str]) -> None:
        statement, sqlstate, message = refusal
        with self.target.connect(user, password) as session:
            with pytest.raises(errors.InsufficientPrivilege) as refused:
                session.execute(statement)
            assert (refused.value.sqlstate, refused.value.diag.message_primary) == (
                sqlstate,
                message,
            )
            # Refused, and nothing changed: the table still holds exactly the seeded rows.
            assert self._orders(session) == list(ORDERS)


# ------------------------------------------------------------------------------ MariaDB


class MariaDb:
    """A MariaDB account with SELECT on ``<database>.orders``; DROP USER and KILL USER in the
    revocation statements delete it and end its sessions."""

    role = "orders-reader"
    instance_tag = "maria"

    # (statement, MariaDB error number, message), with {user}, {host}, {db}, {other} filled in
    REFUSED = {
        "insert-orders": (
            "INSERT INTO orders VALUES (3, 'plum', 1)",
            1142,
            "INSERT command denied to user '{user}'@'{host}' for table `{db}`.`orders`",
        ),
        "update-orders": (
            "UPDATE orders SET quantity = 0",
            1142,
            "UPDATE command denied to user '{user}'@'{host}' for table `{db}`.`orders`",
        ),
        "delete-orders": (
            "DELETE FROM orders",
            1142,
            "DELETE command denied to user '{user}'@'{host}' for table `{db}`.`orders`",
        ),
        "select-customers": (
            "SELECT * FROM customers",
            1142,
            "SELECT command denied to user '{user}'@'{host}' for table `{db}`.`customers`",
        ),
        "create-table": (
            "CREATE TABLE notes (x INT)",
            1142,
            "CREATE command denied to user '{user}'@'{host}' for table `{db}`.`notes`",
        ),
        "drop-table": (
            "DROP TABLE orders",
            1142,
            "DROP command denied to user '{user}'@'{host}' for table `{db}`.`orders`",
        ),
        "select-other-database": (
            "SELECT * FROM `{other}`.ledger",
            1142,
            "SELECT command denied to user '{user}'@'{host}' for table `{other}`.`ledger`",
        ),
        "use-other-database": (
            "USE `{other}`",
            1044,
            "Access denied for user '{user}'@'%' to database '{other}'",
        ),
        "create-user": (
            "CREATE USER 'intruder'@'%'",
            1227,
            "Access denied; you need (at least one of) the CREATE USER privilege(s) for this "
            "operation",
        ),
    }

    def __init__(self, target: MariaDbTarget) -> None:
        self.target = target
        self.side = target.side

    @staticmethod
    def _query(session: pymysql.Connection, statement: str) -> tuple[tuple[Any, ...], ...]:
        with session.cursor() as cur:
            cur.execute(statement)
            return cur.fetchall()

    def check_login(self, user: str, password: str, cred: dict[str, Any]) -> None:
        prefix = re.escape(self.target.login_prefix)
        assert re.fullmatch(rf"{prefix}[A-Za-z0-9]{{16}}", user), user
        assert self.target.accounts_of(user) == ["%"]

    def use(self, user: str, password: str) -> pymysql.Connection:
        session = self.target.connect(user, password, database=self.target.database)
        assert self._query(session, "SELECT CURRENT_USER()") == ((f"{user}@%",),)
        assert self._query(session, "SELECT id, item, quantity FROM orders ORDER BY id") == ORDERS
        # It sees its own database and nothing else of the server.
        visible = {name for (name,) in self._query(session, "SHOW DATABASES")}
        assert visible == {"information_schema", self.target.database}
        assert self.target.sessions_of(user) == 1
        return session

    def login_exists(self, user: str) -> bool:
        return self.target.accounts_of(user) != []

    def session_ended(self, user: str, session: pymysql.Connection) -> Callable[[], bool]:
        return lambda: self.target.sessions_of(user) == 0

    def assert_session_cut(self, session: pymysql.Connection) -> None:
        # Killed by KILL USER; MariaDB would otherwise keep it.
        with pytest.raises(pymysql.err.OperationalError) as lost:
            self._query(session, "SELECT 1")
        assert lost.value.args[0] in (2006, 2013)  # server gone away / lost connection
        session.close()

    def assert_login_refused(self, user: str, password: str) -> None:
        with pytest.raises(pymysql.err.OperationalError) as refused:
            self.target.connect(user, password)
        # For an account that does not exist MariaDB answers 1045 or 1698 at random (it
        # pretends to run some authentication plugin, so that accounts cannot be probed).
        assert refused.value.args[0] in (1045, 1698)
        assert refused.value.args[1].startswith(f"Access denied for user '{user}'@")

    def assert_refused(self, user: str, password: str, refusal: tuple[str, int, str]) -> None:
        statement, errno, message = refusal
        session = self.target.connect(user, password, database=self.target.database)
        try:
            [(seen_as,)] = self._query(session, "SELECT USER()")
            names = {
                "user": user,
                "host": seen_as.rsplit("@", 1)[1],
                "db": self.target.database,
                "other": self.target.other_database,
            }
            with pytest.raises(pymysql.err.OperationalError) as refused:
                self._query(session, statement.format(**names))
            assert refused.value.args == (errno, message.format(**names))
            # Refused, and nothing changed.
            rows = self._query(session, "SELECT id, item, quantity FROM orders ORDER BY id")
            assert rows == ORDERS
        finally:
            session.close()


# -------------------------------------------------------------------------------- Redis

# Redis 7.0 and 7.2+/Valkey word NOPERM errors differently; both name what was refused.
_KEY = (
    r"(this user has no permissions to access one of the keys used as arguments"
    r"|No permissions to access a key)"
)


def _command(name: str) -> str:
    return rf"has no permissions to run the '{re.escape(name)}' command"


class Redis:
    """A Redis ACL user that may GET and SET keys under ``<prefix>orders:`` and nothing
    else; deleting the user also closes the connections it had open."""

    role = "orders-cache"
    instance_tag = "redis"

    # (command with {prefix} filled in, pattern the NOPERM error matches)
    REFUSED = {
        "get-other-key": (("GET", "{prefix}customers:1"), _KEY),
        "set-other-key": (("SET", "{prefix}customers:1", "mallory@example.com"), _KEY),
        "del": (("DEL", "{prefix}orders:1"), _command("del")),
        "keys": (("KEYS", "*"), _command("keys")),
        "flushall": (("FLUSHALL",), _command("flushall")),
        "config-get": (("CONFIG", "GET", "requirepass"), _command("config|get")),
        "acl-setuser": (
            ("ACL", "SETUSER", "intruder", "on", "nopass", "+@all"),
            _command("acl|setuser"),
        ),
    }

    def __init__(self, target: RedisTarget) -> None:
        self.target = target
        self.side = target.side

    def check_login(self, user: str, password: str, cred: dict[str, Any]) -> None:
        # The plugin names users V_<display name>_<ROLE>_<random>_<unix time>, uppercased.
        role = re.escape(self.side.vault_role.upper())
        assert re.fullmatch(rf"V_TOKEN-BROKER-INSTANCE_{role}_[A-Z0-9]{{20}}_\d+", user), user
        # What Redis holds for the user: exactly the role's rules, one password.
        with self.target.server() as server:
            acl = server.acl_getuser(user)
        # Redis keeps a user's rules in a dict; the order it lists them in is not promised
        # (Redis 7 gave '+set +get' for rules written as '+get +set'), so compare as sets.
        assert {
            k: sorted(acl[k]) for k in ("flags", "keys", "channels", "categories", "commands")
        } == {
            "flags": ["on"],
            "keys": [f"~{self.target.key_prefix}orders:*"],
            "channels": [],
            "categories": ["-@all"],
            "commands": ["+get", "+set"],
        }
        assert (len(acl["passwords"]), acl["selectors"]) == (1, [])

    def use(self, user: str, password: str) -> redis.Redis:
        prefix = self.target.key_prefix
        client = self.target.connect(user, password)
        orders = {f"{prefix}orders:{i}": f"{item}:{qty}".encode() for i, item, qty in ORDERS}
        assert [client.get(key) for key in orders] == list(orders.values())
        assert client.set(f"{prefix}orders:3", "plum:1") is True
        assert client.get(f"{prefix}orders:3") == b"plum:1"
        assert self.target.clients_of(user) == 1
        assert user in self.target.acl_users()
        return client

    def login_exists(self, user: str) -> bool:
        return user in self.target.acl_users()

    def session_ended(self, user: str, session: redis.Redis) -> Callable[[], bool]:
        # Deleting an ACL user closes its connections.
        return lambda: self.target.clients_of(user) == 0

    def assert_session_cut(self, session: redis.Redis) -> None:
        session.close()

    def assert_login_refused(self, user: str, password: str) -> None:
        with pytest.raises(redis.AuthenticationError) as refused:
            self.target.connect(user, password).ping()
        assert "invalid username-password pair or user is disabled" in str(refused.value)

    def assert_refused(
        self, user: str, password: str, refusal: tuple[tuple[str, ...], str]
    ) -> None:
        command, pattern = refusal
        prefix = self.target.key_prefix
        with self.target.connect(user, password) as client:
            with pytest.raises(redis.exceptions.NoPermissionError) as refused:
                client.execute_command(*[part.format(prefix=prefix) for part in command])
            assert re.search(pattern, str(refused.value)), str(refused.value)
        # Refused, and nothing changed.
        with self.target.server() as server:
            assert server.get(f"{prefix}customers:1") == b"alice@example.com"
            assert server.get(f"{prefix}orders:1") == b"apple:3"
            assert "intruder" not in self.target.acl_users()


# ---------------------------------------------------------------------------- the story

Database = Postgres | MariaDb | Redis

# target id -> (how its story is told, how its target is built)
TARGETS: dict[str, tuple[type[Database], Callable[[Any, Any], Any]]] = {
    "postgres": (Postgres, lambda vault, pg: postgres_target(vault, pg)),
    "mariadb": (MariaDb, lambda vault, pg: mariadb_target(vault)),
    "redis-plugin": (Redis, lambda vault, pg: redis_target(vault, "redis-database-plugin")),
    "valkey-plugin": (Redis, lambda vault, pg: redis_target(vault, "valkey-database-plugin")),
}
REFUSALS = [
    pytest.param(name, refusal, id=f"{name}-{case}")
    for name, (kind, _) in TARGETS.items()
    for case, refusal in kind.REFUSED.items()
]


@pytest.fixture(scope="module")
def targets(vault, pg) -> Iterator[Callable[[str], Any]]:
    """Each target built the first time a test asks for it, all taken down at the end."""
    with ExitStack() as stack:
        built: dict[str, Any] = {}

        def get(name: str) -> Any:
            if name not in built:
                built[name] = stack.enter_context(TARGETS[name][1](vault, pg))
            return built[name]

        yield get


@pytest.fixture
def database(targets, target_name: str) -> Database:
    return TARGETS[target_name][0](targets(target_name))


@pytest.fixture
async def b(make_broker, database):
    return await make_broker(
        extra_roles={database.role: database.side.broker_role()},
        instance_policies=(database.side.policy,),
    )


@pytest.mark.parametrize("target_name", list(TARGETS), ids=list(TARGETS))
async def test_login_works_until_termination_deletes_it_and_cuts_its_session(
    b, http, database, vault, caplog
):
    caplog.set_level(logging.DEBUG)
    instance = f"i-{database.instance_tag}-1"
    status, cred = await issue(http, b, instance, database.role, ttl="5m")
    assert status == 201, cred
    assert {k: cred[k] for k in ("instance_id", "workload", "role", "kind", "renewable")} == {
        "instance_id": instance,
        "workload": "payments",
        "role": database.role,
        "kind": "database_login",
        "renewable": True,
    }
    assert set(cred["data"]) == {"username", "password"}
    user, password = cred["data"]["username"], cred["data"]["password"]
    database.check_login(user, password, cred)
    session = database.use(user, password)
    session_ended = database.session_ended(user, session)

    [lease] = b.rows("leases")
    assert lease["state"] == "active"
    assert lease["vault_lease_id"].startswith(
        f"{database.side.mount}/creds/{database.side.vault_role}/"
    )

    shown = await terminate(http, b, instance)
    assert (shown["state"], shown["job"]["state"]) == ("terminated", "done")
    assert [x["state"] for x in shown["leases"]] == ["revoked"]
    assert not vault.lease_exists(lease["vault_lease_id"])
    assert not database.login_exists(user)

    # The session opened before termination is cut, not left to run as a deleted login.
    await eventually(session_ended, "the login's session ended")
    database.assert_session_cut(session)
    database.assert_login_refused(user, password)

    status, body = await issue(http, b, instance, database.role)
    assert (status, body["error"]["code"]) == (409, "instance_terminated")
    assert_nowhere_recorded(b, caplog.records, password, user)


@pytest.mark.parametrize(("target_name", "refusal"), REFUSALS)
async def test_login_is_refused_what_its_role_does_not_grant(b, http, database, refusal):
    instance = f"i-{database.instance_tag}-refused"
    status, cred = await issue(http, b, instance, database.role)
    assert status == 201, cred
    user, password = cred["data"]["username"], cred["data"]["password"]
    database.assert_refused(user, password, refusal)
    await release(http, b, instance, cred["lease_id"])
    assert not database.login_exists(user)


# PostgreSQL only: MariaDB's other database is refused in-session (use-other-database
# above), and Redis has no databases to enter.
@pytest.mark.parametrize("target_name", ["postgres"], ids=["postgres"])
async def test_login_cannot_enter_another_database(b, http, database):
    target = database.target
    status, cred = await issue(http, b, "i-pg-otherdb", database.role)
    assert status == 201, cred
    user, password = cred["data"]["username"], cred["data"]["password"]
    with pytest.raises(psycopg.OperationalError) as refused:
        target.connect(user, password, database=target.other_database)
    assert f'permission denied for database "{target.other_database}"' in str(refused.value)
    with target.connect(user, password) as session:  # its own database still lets it in
        assert session.execute("SELECT current_user").fetchone() == (user,)
    await release(http, b, "i-pg-otherdb", cred["lease_id"])
    assert not database.login_exists(user)
