"""The database engine on Redis, through the broker, with OpenBao's redis-database-plugin
and valkey-database-plugin (both speak to Redis 7 and Valkey): the login is an ACL user
that may GET and SET keys under one prefix and nothing else, and termination deletes the
user, which also closes the connection it had open."""

from __future__ import annotations

import logging
import re

import pytest
import redis

from tests.harness.api import eventually, issue, release, terminate
from tests.harness.databases import (
    ORDERS,
    assert_nowhere_recorded,
    redis_target,
)

ROLE = "orders-cache"


@pytest.fixture(
    scope="module",
    params=["redis-database-plugin", "valkey-database-plugin"],
    ids=["redis-plugin", "valkey-plugin"],
)
def target(request, vault):
    with redis_target(vault, request.param) as t:
        yield t


@pytest.fixture
async def b(make_broker, target):
    return await make_broker(
        extra_roles={ROLE: target.side.broker_role()}, instance_policies=(target.side.policy,)
    )


async def test_acl_user_gets_and_sets_its_keys_until_termination_deletes_it(
    b, http, target, vault, caplog
):
    caplog.set_level(logging.DEBUG)
    status, cred = await issue(http, b, "i-redis-1", ROLE, ttl="5m")
    assert status == 201, cred
    assert {k: cred[k] for k in ("instance_id", "workload", "role", "kind", "renewable")} == {
        "instance_id": "i-redis-1",
        "workload": "payments",
        "role": ROLE,
        "kind": "database_login",
        "renewable": True,
    }
    assert set(cred["data"]) == {"username", "password"}
    user, password = cred["data"]["username"], cred["data"]["password"]
    # The plugin names users V_<display name>_<ROLE>_<random>_<unix time>, uppercased.
    assert re.fullmatch(
        rf"V_TOKEN-BROKER-INSTANCE_{re.escape(target.side.vault_role.upper())}_[A-Z0-9]{{20}}_\d+",
        user,
    ), user

    # What Redis holds for the user: exactly the role's rules, one password.
    with target.server() as server:
        acl = server.acl_getuser(user)
    # Redis keeps a user's rules in a dict; the order it lists them in is not promised
    # (Redis 7 gave '+set +get' for rules written as '+get +set'), so compare as sets.
    assert {
        k: sorted(acl[k]) for k in ("flags", "keys", "channels", "categories", "commands")
    } == {
        "flags": ["on"],
        "keys": [f"~{target.key_prefix}orders:*"],
        "channels": [],
        "categories": ["-@all"],
        "commands": ["+get", "+set"],
    }
    assert (len(acl["passwords"]), acl["selectors"]) == (1, [])

    client = target.connect(user, password)
    orders = {f"{target.key_prefix}orders:{i}": f"{item}:{qty}".encode() for i, item, qty in ORDERS}
    assert [client.get(key) for key in orders] == list(orders.values())
    assert client.set(f"{target.key_prefix}orders:3", "plum:1") is True
    assert client.get(f"{target.key_prefix}orders:3") == b"plum:1"
    assert target.clients_of(user) == 1
    assert user in target.acl_users()

    [lease] = b.rows("leases")
    assert lease["state"] == "active"
    assert lease["vault_lease_id"].startswith(
        f"{target.side.mount}/creds/{target.side.vault_role}/"
    )

    shown = await terminate(http, b, "i-redis-1")
    assert (shown["state"], shown["job"]["state"]) == ("terminated", "done")
    assert [x["state"] for x in shown["leases"]] == ["revoked"]
    assert not vault.lease_exists(lease["vault_lease_id"])
    assert user not in target.acl_users()
    # Deleting an ACL user closes its connections: the one open before is gone.
    await eventually(lambda: target.clients_of(user) == 0, "the user's connection closed")
    client.close()
    with pytest.raises(redis.AuthenticationError) as refused:
        target.connect(user, password).ping()
    assert "invalid username-password pair or user is disabled" in str(refused.value)

    status, body = await issue(http, b, "i-redis-1", ROLE)
    assert (status, body["error"]["code"]) == (409, "instance_terminated")
    assert_nowhere_recorded(b, caplog.records, password, user)


# Redis 7.0 and 7.2+/Valkey word NOPERM errors differently; both name what was refused.
_KEY = (
    r"(this user has no permissions to access one of the keys used as arguments"
    r"|No permissions to access a key)"
)


def _command(name: str) -> str:
    return rf"has no permissions to run the '{re.escape(name)}' command"


REFUSED = [
    (("GET", "{prefix}customers:1"), _KEY),
    (("SET", "{prefix}customers:1", "mallory@example.com"), _KEY),
    (("DEL", "{prefix}orders:1"), _command("del")),
    (("KEYS", "*"), _command("keys")),
    (("FLUSHALL",), _command("flushall")),
    (("CONFIG", "GET", "requirepass"), _command("config|get")),
    (("ACL", "SETUSER", "intruder", "on", "nopass", "+@all"), _command("acl|setuser")),
]


@pytest.mark.parametrize(
    "command,refusal",
    REFUSED,
    ids=[
        "get-other-key",
        "set-other-key",
        "del",
        "keys",
        "flushall",
        "config-get",
        "acl-setuser",
    ],
)
async def test_acl_user_is_refused_what_its_role_does_not_grant(b, http, target, command, refusal):
    status, cred = await issue(http, b, "i-redis-refused", ROLE)
    assert status == 201, cred
    user, password = cred["data"]["username"], cred["data"]["password"]
    args = [part.format(prefix=target.key_prefix) for part in command]
    with target.connect(user, password) as client:
        with pytest.raises(redis.exceptions.NoPermissionError) as refused:
            client.execute_command(*args)
        assert re.search(refusal, str(refused.value)), str(refused.value)
    # Refused, and nothing changed.
    with target.server() as server:
        assert server.get(f"{target.key_prefix}customers:1") == b"alice@example.com"
        assert server.get(f"{target.key_prefix}orders:1") == b"apple:3"
        assert "intruder" not in target.acl_users()
    await release(http, b, "i-redis-refused", cred["lease_id"])
    assert user not in target.acl_users()
