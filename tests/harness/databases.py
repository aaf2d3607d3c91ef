"""Databases whose logins OpenBao's database engine mints, for the database engine tests.

For each of PostgreSQL, MariaDB and Redis a context manager builds, on the machine's real
server and the test OpenBao, everything one narrow role needs and takes it all down again:

- a test database (a key prefix in Redis) with one table the role may read (``orders``),
  one it may not (``customers``), and, for SQL, a second database it may not enter;
- an admin account for Vault that holds only what creating and dropping such logins
  takes, never the server's superuser;
- a database mount on OpenBao with a connection and a role, and a ``broker-instance-*``
  policy that lets instance tokens read exactly that role's ``creds`` path.

Names are unique per run. Teardown revokes every lease of the mount (so Vault drops the
logins it made), disables the mount, drops the databases, any login a failed test left
behind (found by its unique prefix) and the admin account. The statements given to Vault
are the ones ``deploy/engines/database.md`` recommends, so the tests prove the document.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import pymysql
import redis
from psycopg import sql

from broker.logs import JsonFormatter
from tests.harness.pgauth import scram_password_matches
from tests.harness.postgres import PgServer
from tests.harness.services import require_service, service_missing
from tests.harness.vault import VaultProbe

MARIADB_HOST, MARIADB_PORT = "127.0.0.1", 3306
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379

# What every test database holds: rows a login may read, and rows it may not.
ORDERS = ((1, "apple", 3), (2, "pear", 5))
CUSTOMERS = ((1, "alice@example.com"),)


def _vault_ok(answer: tuple[int, Any], what: str) -> Any:
    status, body = answer
    assert 200 <= status < 300, f"OpenBao refused to {what}: {status} {body}"
    return body


@dataclass(frozen=True)
class VaultSide:
    """The mount, Vault role and instance policy one test database is served through."""

    mount: str
    vault_role: str
    policy: str  # a broker-instance-* policy: read on <mount>/creds/<vault_role> only

    def broker_role(self, **overrides: Any) -> dict[str, Any]:
        """A broker role for ``make_broker(extra_roles=...)``."""
        return {
            "engine": "database",
            "mount": self.mount,
            "vault_role": self.vault_role,
            "default_ttl": "10m",
            "max_ttl": "1h",
            **overrides,
        }


def _vault_database(
    stack: ExitStack,
    vault: VaultProbe,
    *,
    mount: str,
    connection: str,
    vault_role: str,
    policy: str,
    config: dict[str, Any],
    role: dict[str, Any],
) -> VaultSide:
    """Mount, connection, role and instance policy; their teardown pushed on ``stack``."""
    _vault_ok(vault.call("POST", f"sys/mounts/{mount}", {"type": "database"}), "mount")

    def unmount() -> None:
        # Vault runs each lease's revocation statements, so no login outlives the mount.
        _vault_ok(
            vault.call("PUT", f"sys/leases/revoke-prefix/{mount}", {"sync": True}),
            "revoke the mount's leases",
        )
        _vault_ok(vault.call("DELETE", f"sys/mounts/{mount}"), "unmount")

    stack.callback(unmount)
    _vault_ok(
        vault.call(
            "POST",
            f"{mount}/config/{connection}",
            {**config, "allowed_roles": [vault_role], "verify_connection": True},
        ),
        "configure the connection",
    )
    _vault_ok(
        vault.call("POST", f"{mount}/roles/{vault_role}", {"db_name": connection, **role}),
        "write the role",
    )
    rules = f'path "{mount}/creds/{vault_role}" {{ capabilities = ["read"] }}\n'
    _vault_ok(vault.call("PUT", f"sys/policies/acl/{policy}", {"policy": rules}), "write policy")
    stack.callback(lambda: vault.call("DELETE", f"sys/policies/acl/{policy}"))
    return VaultSide(mount, vault_role, policy)


# --------------------------------------------------------------------------- PostgreSQL


def postgres_creation_statements(database: str) -> list[str]:
    """A login that can connect to ``database`` and read ``app.orders``; nothing else.
    ``VALID UNTIL`` makes PostgreSQL itself refuse the password once the lease ends, even
    if Vault never gets to revoke it (the broker's renewals move it with the lease)."""
    return [
        "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
        f'GRANT CONNECT ON DATABASE "{database}" TO "{{{{name}}}}";',
        'GRANT USAGE ON SCHEMA app TO "{{name}}";',
        'GRANT SELECT ON app.orders TO "{{name}}";',
    ]


def postgres_revocation_statements(database: str) -> list[str]:
    """Take back exactly what the creation statements granted, drop the login and end
    its open sessions, in Vault's one transaction. Idempotent (a login already gone is not
    an error, so a retried revocation cannot get stuck). Sessions are found by the role's
    oid: once the role is dropped, pg_stat_activity has no name for them."""
    return [
        f"""DO $$
DECLARE
  login oid := (SELECT oid FROM pg_roles WHERE rolname = '{{{{name}}}}');
BEGIN
  IF login IS NULL THEN
    RETURN;
  END IF;
  REVOKE SELECT ON app.orders FROM "{{{{name}}}}";
  REVOKE USAGE ON SCHEMA app FROM "{{{{name}}}}";
  REVOKE CONNECT ON DATABASE "{database}" FROM "{{{{name}}}}";
  DROP ROLE "{{{{name}}}}";
  PERFORM pg_terminate_backend(pid) FROM pg_stat_activity WHERE usesysid = login;
END
$$;"""
    ]


# Vault's default puts the token's display name ("token-br") first; the role name says
# which broker role a session belongs to. Leftovers are found by this prefix.
POSTGRES_USERNAME_TEMPLATE = (
    '{{ printf "v-%s-%s-%s" (.RoleName | truncate 24) (random 20) (unix_time) | truncate 63 }}'
)


@dataclass(frozen=True)
class PostgresTarget:
    side: VaultSide
    server: PgServer
    database: str
    other_database: str  # CONNECT revoked from PUBLIC; the login must not get in
    admin_role: str
    login_prefix: str  # every login this role's connection creates starts with it

    def connect(self, user: str, password: str, database: str | None = None) -> psycopg.Connection:
        return psycopg.connect(
            host=self.server.host,
            port=self.server.port,
            dbname=database or self.database,
            user=user,
            password=password,
            connect_timeout=5,
            autocommit=True,
        )

    def _admin(self, query: str, params: tuple[Any, ...]) -> Any:
        with psycopg.connect(self.server.admin_url, connect_timeout=5) as conn:
            return conn.execute(query, params).fetchone()

    def role_exists(self, user: str) -> bool:
        return self.server.role_exists(user)

    def password_matches(self, user: str, password: str) -> bool:
        return scram_password_matches(self.server.admin_url, user, password)

    def valid_until(self, user: str) -> datetime | None:
        row = self._admin("SELECT rolvaliduntil FROM pg_roles WHERE rolname = %s", (user,))
        return row[0] if row else None

    def backend_alive(self, pid: int) -> bool:
        # By pid: a dropped role's sessions show no user name in pg_stat_activity.
        return self._admin("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)) is not None


def _pg_exec(url: str, *statements: sql.Composable | str) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        for statement in statements:
            conn.execute(statement)


@contextmanager
def postgres_target(vault: VaultProbe, server: PgServer) -> Iterator[PostgresTarget]:
    tag = secrets.token_hex(4)
    database, other = f"brk_dbeng_{tag}", f"brk_dbeng_other_{tag}"
    admin, admin_password = f"brk_vault_admin_{tag}", secrets.token_urlsafe(24)
    vault_role = f"orders-ro-{tag}"
    login_prefix = f"v-{vault_role}-"
    ident = sql.Identifier
    with ExitStack() as stack:
        # The account Vault uses: creates and drops logins and ends their sessions, and
        # can hand on only what it holds WITH GRANT OPTION. Neither superuser nor owner.
        _pg_exec(
            server.admin_url,
            sql.SQL("CREATE ROLE {} WITH LOGIN CREATEROLE PASSWORD {}").format(
                ident(admin), sql.Literal(admin_password)
            ),
            sql.SQL("GRANT pg_signal_backend TO {}").format(ident(admin)),
        )

        def drop_roles() -> None:
            with psycopg.connect(server.admin_url, autocommit=True, connect_timeout=5) as conn:
                left = conn.execute(
                    "SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)",
                    (login_prefix,),
                ).fetchall()
                for (name,) in left:
                    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident(name)))
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident(admin)))

        stack.callback(drop_roles)
        for name in (database, other):
            _pg_exec(
                server.admin_url,
                sql.SQL("CREATE DATABASE {}").format(ident(name)),
                sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(ident(name)),
            )
            stack.callback(
                _pg_exec,
                server.admin_url,
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident(name)),
            )
        with psycopg.connect(server.url(database), autocommit=True, connect_timeout=5) as conn:
            conn.execute("CREATE SCHEMA app")
            conn.execute(
                "CREATE TABLE app.orders "
                "(id int PRIMARY KEY, item text NOT NULL, quantity int NOT NULL)"
            )
            conn.execute("CREATE TABLE app.customers (id int PRIMARY KEY, email text NOT NULL)")
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO app.orders VALUES (%s, %s, %s)", ORDERS)
                cur.executemany("INSERT INTO app.customers VALUES (%s, %s)", CUSTOMERS)
            conn.execute(
                sql.SQL("GRANT CONNECT ON DATABASE {} TO {} WITH GRANT OPTION").format(
                    ident(database), ident(admin)
                )
            )
            conn.execute(
                sql.SQL("GRANT USAGE ON SCHEMA app TO {} WITH GRANT OPTION").format(ident(admin))
            )
            conn.execute(
                sql.SQL("GRANT SELECT ON app.orders TO {} WITH GRANT OPTION").format(ident(admin))
            )
        side = _vault_database(
            stack,
            vault,
            mount=f"db-pg-{tag}",
            connection="orders",
            vault_role=vault_role,
            policy=f"broker-instance-db-pg-{tag}",
            config={
                "plugin_name": "postgresql-database-plugin",
                "connection_url": (
                    "postgresql://{{username}}:{{password}}@"
                    f"{server.host}:{server.port}/{database}?sslmode=disable"
                ),
                "username": admin,
                "password": admin_password,
                "password_authentication": "scram-sha-256",
                "username_template": POSTGRES_USERNAME_TEMPLATE,
            },
            role={
                "creation_statements": postgres_creation_statements(database),
                "revocation_statements": postgres_revocation_statements(database),
                "default_ttl": "10m",
                "max_ttl": "1h",
            },
        )
        yield PostgresTarget(side, server, database, other, admin, login_prefix)


# ------------------------------------------------------------------------------ MariaDB


def mariadb_creation_statements(database: str) -> list[str]:
    """A login that can read ``<database>.orders``; nothing else. MariaDB has no password
    expiry that refuses a login, so revocation is the only end of it."""
    return [
        "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}';",
        f"GRANT SELECT ON `{database}`.`orders` TO '{{{{name}}}}'@'%';",
    ]


# DROP USER takes the account's grants with it; KILL USER (MariaDB only) then ends the
# sessions already open, which would otherwise live on. IF EXISTS: idempotent, because
# MariaDB commits each DDL statement on its own and a retried revocation must not stick.
MARIADB_REVOCATION_STATEMENTS = ["DROP USER IF EXISTS '{{name}}'@'%'; KILL USER '{{name}}'@'%';"]
MARIADB_USERNAME_TEMPLATE = (
    '{{ printf "v-%s-%s" (.RoleName | truncate 12) (random 16) | truncate 32 }}'
)


@dataclass(frozen=True)
class MariaDbTarget:
    side: VaultSide
    database: str
    other_database: str
    admin_user: str
    login_prefix: str

    @staticmethod
    def connect(user: str, password: str, database: str | None = None) -> pymysql.Connection:
        return pymysql.connect(
            host=MARIADB_HOST,
            port=MARIADB_PORT,
            user=user,
            password=password,
            database=database,
            connect_timeout=5,
            read_timeout=10,
            write_timeout=10,
            autocommit=True,
        )

    def _root(self, query: str, params: tuple[Any, ...]) -> tuple[tuple[Any, ...], ...]:
        conn = _mariadb_root()
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall()
        finally:
            conn.close()

    def accounts_of(self, user: str) -> list[str]:
        return [h for (h,) in self._root("SELECT host FROM mysql.user WHERE user = %s", (user,))]

    def sessions_of(self, user: str) -> int:
        rows = self._root(
            "SELECT count(*) FROM information_schema.processlist WHERE user = %s", (user,)
        )
        return int(rows[0][0])


def _mariadb_root() -> pymysql.Connection:
    return pymysql.connect(
        host=MARIADB_HOST,
        port=MARIADB_PORT,
        user="root",
        password="",
        connect_timeout=5,
        read_timeout=30,
        write_timeout=30,
        autocommit=True,
    )


@contextmanager
def mariadb_target(vault: VaultProbe) -> Iterator[MariaDbTarget]:
    require_service("MariaDB", MARIADB_HOST, MARIADB_PORT)
    try:
        root = _mariadb_root()
    except pymysql.err.OperationalError as exc:
        service_missing(
            "MariaDB",
            f"root@{MARIADB_HOST} with an empty password is refused (error {exc.args[0]})",
        )
    tag = secrets.token_hex(4)
    database, other = f"brk_dbeng_{tag}", f"brk_dbeng_other_{tag}"
    admin, admin_password = f"brk_vault_{tag}", secrets.token_urlsafe(24)
    vault_role = f"ro-{tag}"
    login_prefix = f"v-{vault_role}-"
    with ExitStack() as stack:
        stack.callback(root.close)
        cur = stack.enter_context(root.cursor())

        def drop_accounts() -> None:
            cur.execute(
                "SELECT user, host FROM mysql.user WHERE user = %s OR LEFT(user, %s) = %s",
                (admin, len(login_prefix), login_prefix),
            )
            for user, host in cur.fetchall():
                cur.execute("DROP USER IF EXISTS %s@%s", (user, host))

        stack.callback(drop_accounts)
        # The account Vault uses: may create and drop accounts, hand on SELECT on the one
        # table, and end other accounts' sessions. Not root.
        cur.execute("CREATE USER %s@'127.0.0.1' IDENTIFIED BY %s", (admin, admin_password))
        cur.execute(f"GRANT CREATE USER, CONNECTION ADMIN ON *.* TO '{admin}'@'127.0.0.1'")
        for name in (database, other):
            cur.execute(f"CREATE DATABASE `{name}`")
            stack.callback(cur.execute, f"DROP DATABASE IF EXISTS `{name}`")
        cur.execute(
            f"CREATE TABLE `{database}`.orders "
            "(id INT PRIMARY KEY, item VARCHAR(40) NOT NULL, quantity INT NOT NULL)"
        )
        cur.execute(
            f"CREATE TABLE `{database}`.customers (id INT PRIMARY KEY, email VARCHAR(80) NOT NULL)"
        )
        cur.execute(f"CREATE TABLE `{other}`.ledger (id INT PRIMARY KEY)")
        cur.executemany(f"INSERT INTO `{database}`.orders VALUES (%s, %s, %s)", ORDERS)
        cur.executemany(f"INSERT INTO `{database}`.customers VALUES (%s, %s)", CUSTOMERS)
        cur.execute(
            f"GRANT SELECT ON `{database}`.`orders` TO '{admin}'@'127.0.0.1' WITH GRANT OPTION"
        )
        side = _vault_database(
            stack,
            vault,
            mount=f"db-maria-{tag}",
            connection="orders",
            vault_role=vault_role,
            policy=f"broker-instance-db-maria-{tag}",
            config={
                "plugin_name": "mysql-database-plugin",
                "connection_url": (
                    f"{{{{username}}}}:{{{{password}}}}@tcp({MARIADB_HOST}:{MARIADB_PORT})/"
                ),
                "username": admin,
                "password": admin_password,
                "username_template": MARIADB_USERNAME_TEMPLATE,
            },
            role={
                "creation_statements": mariadb_creation_statements(database),
                "revocation_statements": MARIADB_REVOCATION_STATEMENTS,
                "default_ttl": "10m",
                "max_ttl": "1h",
            },
        )
        yield MariaDbTarget(side, database, other, admin, login_prefix)


# -------------------------------------------------------------------------------- Redis


def redis_creation_statements(key_prefix: str) -> list[str]:
    """One JSON list of ACL rules for ``ACL SETUSER``: GET and SET on ``<prefix>orders:*``
    and nothing else (a new ACL user starts with no commands, keys or channels)."""
    return [json.dumps([f"~{key_prefix}orders:*", "resetchannels", "+get", "+set"])]


# The account Vault uses. Note that ACL SETUSER is all it takes to make any user at all:
# this account is as powerful as the server's admin, and is kept as secret.
REDIS_ADMIN_RULES = (
    "resetkeys",
    "resetchannels",
    "-@all",
    "+acl|setuser",
    "+acl|deluser",
    "+acl|getuser",
    "+ping",
)


@dataclass(frozen=True)
class RedisTarget:
    side: VaultSide
    plugin: str
    key_prefix: str  # every key of this target starts with it
    admin_user: str

    @staticmethod
    def connect(user: str, password: str) -> redis.Redis:
        return redis.Redis(
            host=REDIS_HOST,
            port=REDIS_PORT,
            username=user,
            password=password,
            socket_timeout=5,
            socket_connect_timeout=5,
        )

    @staticmethod
    def server() -> redis.Redis:
        return redis.Redis(
            host=REDIS_HOST, port=REDIS_PORT, socket_timeout=5, socket_connect_timeout=5
        )

    def acl_users(self) -> list[str]:
        with self.server() as r:
            return [u.decode() for u in r.execute_command("ACL", "USERS")]

    def clients_of(self, user: str) -> int:
        with self.server() as r:
            return sum(1 for c in r.client_list() if c.get("user") == user)


@contextmanager
def redis_target(vault: VaultProbe, plugin: str) -> Iterator[RedisTarget]:
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    tag = secrets.token_hex(4)
    key_prefix = f"brk-{tag}:"
    admin, admin_password = f"brk-vault-{tag}", secrets.token_urlsafe(24)
    vault_role = f"rw-{tag}"
    with ExitStack() as stack:
        r = stack.enter_context(RedisTarget.server())
        try:
            r.ping()
        except (redis.AuthenticationError, redis.ResponseError) as exc:
            service_missing("Redis", f"the default user cannot be used here ({type(exc).__name__})")

        def cleanup() -> None:
            # The plugin names logins V_<display name>_<ROLE>_<random>_<time>, uppercased.
            marker = f"_{vault_role.upper()}_"
            for user in r.execute_command("ACL", "USERS"):
                if marker in user.decode() or user.decode() == admin:
                    r.execute_command("ACL", "DELUSER", user)
            for _ in range(100):  # bounded: a handful of keys
                keys = list(r.scan_iter(match=f"{key_prefix}*", count=100))
                if not keys:
                    break
                r.delete(*keys)

        stack.callback(cleanup)
        r.execute_command("ACL", "SETUSER", admin, "on", f">{admin_password}", *REDIS_ADMIN_RULES)
        for order_id, item, quantity in ORDERS:
            r.set(f"{key_prefix}orders:{order_id}", f"{item}:{quantity}")
        for customer_id, email in CUSTOMERS:
            r.set(f"{key_prefix}customers:{customer_id}", email)
        side = _vault_database(
            stack,
            vault,
            mount=f"db-redis-{tag}",
            connection="cache",
            vault_role=vault_role,
            policy=f"broker-instance-db-redis-{tag}",
            config={
                "plugin_name": plugin,
                "host": REDIS_HOST,
                "port": REDIS_PORT,
                "username": admin,
                "password": admin_password,
            },
            role={
                "creation_statements": redis_creation_statements(key_prefix),
                "default_ttl": "10m",
                "max_ttl": "1h",
            },
        )
        yield RedisTarget(side, plugin, key_prefix, admin)


# ------------------------------------------------------------------------ broker helpers


def lifetime_s(cred: dict[str, Any]) -> float:
    return (
        datetime.fromisoformat(cred["expires_at"]) - datetime.fromisoformat(cred["issued_at"])
    ).total_seconds()


STORE_TABLES = ("instances", "instance_tokens", "leases", "revocation_jobs", "audit_events")


def store_without_refs(b: Any) -> tuple[str, list[Any]]:
    """The lease store as text with every ``credential_ref`` taken out, and those refs.
    A credential's non-secret identifier (a login name, a serial) is recorded there on
    purpose: what an operator needs to clean up a lease Vault forgot."""
    refs: list[Any] = []

    def without_refs(value: Any) -> Any:
        if isinstance(value, dict):
            if "credential_ref" in value:
                refs.append(value["credential_ref"])
            return {k: without_refs(v) for k, v in value.items() if k != "credential_ref"}
        if isinstance(value, list):
            return [without_refs(v) for v in value]
        if isinstance(value, str) and value.startswith("{"):
            try:
                return without_refs(json.loads(value))
            except ValueError:
                return value
        return value

    return repr([without_refs(b.rows(table)) for table in STORE_TABLES]), refs


def assert_nowhere_recorded(
    b: Any, records: list[logging.LogRecord], secret: str, login: str
) -> None:
    """The password is in neither the lease store nor a log line; the login name is in the
    store only as ``credential_ref`` (its lease's, and the ``lease.issued`` event's), and
    in no log line."""
    store, refs = store_without_refs(b)
    assert {"username": login} in refs
    fmt = JsonFormatter()
    logs = "\n".join(fmt.format(r) for r in records)
    assert records, "expected the broker to log something"
    for value in (secret, login):
        assert value not in store
        assert value not in logs
    assert secret not in repr(refs)
