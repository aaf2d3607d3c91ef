"""The database engine on MariaDB (OpenBao's mysql-database-plugin), through the broker,
with a narrow Vault role: the login reads the one table it is granted, sees no other
database and is refused everything else, and termination drops the account and ends the
session it had open (KILL USER in the revocation statements)."""

from __future__ import annotations

import logging
import re

import pymysql
import pytest

from tests.harness.api import eventually, issue, release, terminate
from tests.harness.databases import (
    ORDERS,
    assert_nowhere_recorded,
    mariadb_target,
)

ROLE = "orders-reader"


@pytest.fixture(scope="module")
def target(vault):
    with mariadb_target(vault) as t:
        yield t


@pytest.fixture
async def b(make_broker, target):
    return await make_broker(
        extra_roles={ROLE: target.side.broker_role()}, instance_policies=(target.side.policy,)
    )


def _query(session: pymysql.Connection, statement: str) -> tuple[tuple, ...]:
    with session.cursor() as cur:
        cur.execute(statement)
        return cur.fetchall()


async def test_login_reads_its_table_until_termination_drops_it_and_ends_its_session(
    b, http, target, vault, caplog
):
    caplog.set_level(logging.DEBUG)
    status, cred = await issue(http, b, "i-maria-1", ROLE, ttl="5m")
    assert status == 201, cred
    assert {k: cred[k] for k in ("instance_id", "workload", "role", "kind", "renewable")} == {
        "instance_id": "i-maria-1",
        "workload": "payments",
        "role": ROLE,
        "kind": "database_login",
        "renewable": True,
    }
    assert set(cred["data"]) == {"username", "password"}
    user, password = cred["data"]["username"], cred["data"]["password"]
    assert re.fullmatch(rf"{re.escape(target.login_prefix)}[A-Za-z0-9]{{16}}", user), user
    assert target.accounts_of(user) == ["%"]

    session = target.connect(user, password, database=target.database)
    assert _query(session, "SELECT CURRENT_USER()") == ((f"{user}@%",),)
    assert _query(session, "SELECT id, item, quantity FROM orders ORDER BY id") == ORDERS
    # It sees its own database and nothing else of the server.
    visible = {name for (name,) in _query(session, "SHOW DATABASES")}
    assert visible == {"information_schema", target.database}
    assert target.sessions_of(user) == 1

    [lease] = b.rows("leases")
    assert lease["state"] == "active"
    assert lease["vault_lease_id"].startswith(
        f"{target.side.mount}/creds/{target.side.vault_role}/"
    )

    shown = await terminate(http, b, "i-maria-1")
    assert (shown["state"], shown["job"]["state"]) == ("terminated", "done")
    assert [x["state"] for x in shown["leases"]] == ["revoked"]
    assert not vault.lease_exists(lease["vault_lease_id"])
    assert target.accounts_of(user) == []

    # The session opened before termination is killed; MariaDB would otherwise keep it.
    await eventually(lambda: target.sessions_of(user) == 0, "the login's session ended")
    with pytest.raises(pymysql.err.OperationalError) as lost:
        _query(session, "SELECT 1")
    assert lost.value.args[0] in (2006, 2013)  # server gone away / lost connection
    session.close()
    with pytest.raises(pymysql.err.OperationalError) as refused:
        target.connect(user, password)
    # For an account that does not exist MariaDB answers 1045 or 1698 at random (it
    # pretends to run some authentication plugin, so that accounts cannot be probed).
    assert refused.value.args[0] in (1045, 1698)
    assert refused.value.args[1].startswith(f"Access denied for user '{user}'@")

    status, body = await issue(http, b, "i-maria-1", ROLE)
    assert (status, body["error"]["code"]) == (409, "instance_terminated")
    assert_nowhere_recorded(b, caplog.records, password, user)


# (statement, MariaDB error number, message with {user}, {host}, {db}, {other} filled in)
REFUSED = [
    (
        "INSERT INTO orders VALUES (3, 'plum', 1)",
        1142,
        "INSERT command denied to user '{user}'@'{host}' for table `{db}`.`orders`",
    ),
    (
        "UPDATE orders SET quantity = 0",
        1142,
        "UPDATE command denied to user '{user}'@'{host}' for table `{db}`.`orders`",
    ),
    (
        "DELETE FROM orders",
        1142,
        "DELETE command denied to user '{user}'@'{host}' for table `{db}`.`orders`",
    ),
    (
        "SELECT * FROM customers",
        1142,
        "SELECT command denied to user '{user}'@'{host}' for table `{db}`.`customers`",
    ),
    (
        "CREATE TABLE notes (x INT)",
        1142,
        "CREATE command denied to user '{user}'@'{host}' for table `{db}`.`notes`",
    ),
    (
        "DROP TABLE orders",
        1142,
        "DROP command denied to user '{user}'@'{host}' for table `{db}`.`orders`",
    ),
    (
        "SELECT * FROM `{other}`.ledger",
        1142,
        "SELECT command denied to user '{user}'@'{host}' for table `{other}`.`ledger`",
    ),
    ("USE `{other}`", 1044, "Access denied for user '{user}'@'%' to database '{other}'"),
    (
        "CREATE USER 'intruder'@'%'",
        1227,
        "Access denied; you need (at least one of) the CREATE USER privilege(s) for this operation",
    ),
]


@pytest.mark.parametrize(
    "statement,errno,message",
    REFUSED,
    ids=[
        "insert-orders",
        "update-orders",
        "delete-orders",
        "select-customers",
        "create-table",
        "drop-table",
        "select-other-database",
        "use-other-database",
        "create-user",
    ],
)
async def test_login_is_refused_what_its_role_does_not_grant(
    b, http, target, statement, errno, message
):
    status, cred = await issue(http, b, "i-maria-refused", ROLE)
    assert status == 201, cred
    user, password = cred["data"]["username"], cred["data"]["password"]
    session = target.connect(user, password, database=target.database)
    try:
        [(seen_as,)] = _query(session, "SELECT USER()")
        host = seen_as.rsplit("@", 1)[1]
        names = {"user": user, "host": host, "db": target.database, "other": target.other_database}
        with pytest.raises(pymysql.err.OperationalError) as refused:
            _query(session, statement.format(**names))
        assert refused.value.args == (errno, message.format(**names))
        # Refused, and nothing changed.
        assert _query(session, "SELECT id, item, quantity FROM orders ORDER BY id") == ORDERS
    finally:
        session.close()
    await release(http, b, "i-maria-refused", cred["lease_id"])
    assert target.accounts_of(user) == []
