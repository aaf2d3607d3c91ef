"""The database engine on PostgreSQL, through the broker, with a narrow Vault role: the
login reads the one table it is granted and is refused everything else, PostgreSQL itself
stops taking its password when the lease ends, and termination drops it and cuts the
session it had open."""

from __future__ import annotations

import logging
from datetime import datetime

import psycopg
import pytest
from psycopg import errors

from tests.harness.api import eventually, issue, release, terminate
from tests.harness.databases import (
    ORDERS,
    assert_nowhere_recorded,
    lifetime_s,
    postgres_target,
)

ROLE = "orders-reader"


@pytest.fixture(scope="module")
def target(vault, pg):
    with postgres_target(vault, pg) as t:
        yield t


@pytest.fixture
async def b(make_broker, target):
    return await make_broker(
        extra_roles={ROLE: target.side.broker_role()}, instance_policies=(target.side.policy,)
    )


async def test_login_reads_its_table_until_termination_drops_it_and_cuts_its_session(
    b, http, target, vault, caplog
):
    caplog.set_level(logging.DEBUG)
    status, cred = await issue(http, b, "i-pg-1", ROLE, ttl="5m")
    assert status == 201, cred
    assert {k: cred[k] for k in ("instance_id", "workload", "role", "kind", "renewable")} == {
        "instance_id": "i-pg-1",
        "workload": "payments",
        "role": ROLE,
        "kind": "database_login",
        "renewable": True,
    }
    assert set(cred["data"]) == {"username", "password"}
    user, password = cred["data"]["username"], cred["data"]["password"]
    assert user.startswith(target.login_prefix)
    assert 280 <= lifetime_s(cred) <= 300  # the 5m asked for, not the Vault role's 10m

    # PostgreSQL holds this very password, and refuses it after the lease's end: the
    # broker's TTL reached the database (VALID UNTIL), not only Vault's lease.
    assert target.password_matches(user, password)
    assert not target.password_matches(user, password + "x")
    valid_until = target.valid_until(user)
    assert valid_until is not None
    assert abs((valid_until - datetime.fromisoformat(cred["expires_at"])).total_seconds()) < 5

    session = target.connect(user, password)
    pid = session.info.backend_pid
    assert session.execute("SELECT current_user, current_database()").fetchone() == (
        user,
        target.database,
    )
    rows = session.execute("SELECT id, item, quantity FROM app.orders ORDER BY id").fetchall()
    assert rows == list(ORDERS)

    [lease] = b.rows("leases")
    assert lease["state"] == "active"
    assert lease["vault_lease_id"].startswith(
        f"{target.side.mount}/creds/{target.side.vault_role}/"
    )

    shown = await terminate(http, b, "i-pg-1")
    assert (shown["state"], shown["job"]["state"]) == ("terminated", "done")
    assert [x["state"] for x in shown["leases"]] == ["revoked"]
    assert not vault.lease_exists(lease["vault_lease_id"])
    assert not target.role_exists(user)

    # The session opened before termination is ended, not left to run as a dropped role.
    await eventually(lambda: not target.backend_alive(pid), "the login's session ended")
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")
    session.close()
    with pytest.raises(psycopg.OperationalError) as refused:
        target.connect(user, password)
    # The test servers trust loopback logins, so the refusal is the missing role; on a
    # server that checks passwords it is the failed password.
    assert any(
        why in str(refused.value)
        for why in (f'role "{user}" does not exist', f'authentication failed for user "{user}"')
    ), str(refused.value)

    status, body = await issue(http, b, "i-pg-1", ROLE)
    assert (status, body["error"]["code"]) == (409, "instance_terminated")
    assert_nowhere_recorded(b, caplog.records, password, user)


REFUSED = [
    ("INSERT INTO app.orders VALUES (3, 'plum', 1)", "permission denied for table orders"),
    ("UPDATE app.orders SET quantity = 0", "permission denied for table orders"),
    ("DELETE FROM app.orders", "permission denied for table orders"),
    ("TRUNCATE app.orders", "permission denied for table orders"),
    ("SELECT * FROM app.customers", "permission denied for table customers"),
    ("CREATE TABLE app.notes (x int)", "permission denied for schema app"),
    ("CREATE TABLE public.notes (x int)", "permission denied for schema public"),
    ("CREATE ROLE intruder", "permission denied to create role"),
]


@pytest.mark.parametrize(
    "statement,message",
    REFUSED,
    ids=[
        "insert-orders",
        "update-orders",
        "delete-orders",
        "truncate-orders",
        "select-customers",
        "create-table-in-app",
        "create-table-in-public",
        "create-role",
    ],
)
async def test_login_is_refused_what_its_role_does_not_grant(b, http, target, statement, message):
    status, cred = await issue(http, b, "i-pg-refused", ROLE)
    assert status == 201, cred
    user, password = cred["data"]["username"], cred["data"]["password"]
    with target.connect(user, password) as session:
        with pytest.raises(errors.InsufficientPrivilege) as refused:
            session.execute(statement)
        assert (refused.value.sqlstate, refused.value.diag.message_primary) == ("42501", message)
        # Refused, and nothing changed: the table still holds exactly the seeded rows.
        rows = session.execute("SELECT id, item, quantity FROM app.orders ORDER BY id").fetchall()
        assert rows == list(ORDERS)
    await release(http, b, "i-pg-refused", cred["lease_id"])
    assert not target.role_exists(user)


async def test_login_cannot_enter_another_database(b, http, target):
    status, cred = await issue(http, b, "i-pg-otherdb", ROLE)
    assert status == 201, cred
    user, password = cred["data"]["username"], cred["data"]["password"]
    with pytest.raises(psycopg.OperationalError) as refused:
        target.connect(user, password, database=target.other_database)
    assert f'permission denied for database "{target.other_database}"' in str(refused.value)
    with target.connect(user, password) as session:  # its own database still lets it in
        assert session.execute("SELECT current_user").fetchone() == (user,)
    await release(http, b, "i-pg-otherdb", cred["lease_id"])
    assert not target.role_exists(user)
