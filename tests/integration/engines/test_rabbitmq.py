"""The rabbitmq engine end to end: OpenBao's rabbitmq secrets engine creating real users in
the machine's RabbitMQ through its management API, and pika logging in with them.

A login may do exactly what the Vault role grants in the vhost it names and nothing in
another; termination deletes the user, which also cuts its open connections."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pika
import pika.exceptions
import pytest

from tests.harness.api import bearer, issue, wait_job
from tests.harness.databases import store_without_refs
from tests.harness.rabbitmq import (
    AMQP_PORT,
    HOST,
    PERMISSIONS,
    Rabbit,
    mounted_rabbitmq,
)
from tests.harness.wait import eventually_sync

# What pika reports for a user RabbitMQ does not know (or a wrong password).
LOGIN_REFUSED = (
    "ConnectionClosedByBroker: (403) 'ACCESS_REFUSED - Login was refused using "
    "authentication mechanism PLAIN. For details see the broker logfile.'"
)


@pytest.fixture(scope="module")
def rabbit(vault) -> Iterator[Rabbit]:
    with mounted_rabbitmq(vault) as mounted:
        yield mounted








def _connect(vhost: str, user: str, password: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(
        pika.ConnectionParameters(
            HOST,
            AMQP_PORT,
            vhost,
            pika.PlainCredentials(user, password),
            connection_attempts=1,
            socket_timeout=5,
            stack_timeout=10,
            blocked_connection_timeout=5,
        )
    )


def _round_trip(vhost: str, user: str, password: str, body: bytes) -> bytes:
    """Declare an allowed queue, publish to it through the default exchange, read it back."""
    conn = _connect(vhost, user, password)
    try:
        channel = conn.channel()
        channel.queue_declare("app.jobs", auto_delete=True)
        channel.basic_publish("", "app.jobs", body)
        return eventually_sync(lambda: channel.basic_get("app.jobs", auto_ack=True)[2],
                               "the message read back", interval=0.1)
    finally:
        if conn.is_open:
            conn.close()


def _declare_outside_the_grant(vhost: str, user: str, password: str) -> None:
    conn = _connect(vhost, user, password)
    try:
        conn.channel().queue_declare("other.jobs")
    finally:
        if conn.is_open:
            conn.close()


def _lifetime(cred: dict) -> float:
    return (
        datetime.fromisoformat(cred["expires_at"]) - datetime.fromisoformat(cred["issued_at"])
    ).total_seconds()


async def test_login_may_use_its_granted_vhost_and_nothing_else(make_broker, http, vault, rabbit):
    b = await make_broker(
        extra_roles={"mq": rabbit.broker_role()}, instance_policies=(rabbit.policy,)
    )
    status, cred = await issue(http, b, "i-mq-use", "mq", ttl="5m")
    assert status == 201, cred
    assert (
        cred["instance_id"],
        cred["workload"],
        cred["role"],
        cred["kind"],
        cred["renewable"],
        cred["leased"],
    ) == ("i-mq-use", "payments", "mq", "rabbitmq_login", True, True)
    assert set(cred["data"]) == {"username", "password"}
    user, password = cred["data"]["username"], cred["data"]["password"]
    assert user.startswith(rabbit.user_prefix) and len(user) == len(rabbit.user_prefix) + 20
    # Vault's rabbitmq reads take no TTL: the lease came at config/lease's 10m and the
    # broker renewed it to the 5m asked for. Vault agrees.
    assert 290 <= _lifetime(cred) <= 300
    [lease] = b.rows("leases")
    assert lease["state"] == "active"
    assert lease["vault_lease_id"].startswith(f"{rabbit.mount}/creds/{rabbit.vault_role}/")
    status, looked = vault.call("PUT", "sys/leases/lookup", {"lease_id": lease["vault_lease_id"]})
    assert status == 200 and 280 <= looked["data"]["ttl"] <= 300

    # RabbitMQ holds the user with exactly the Vault role's permissions, no tags.
    info = rabbit.admin.user_info(user)
    assert info is not None and (info["name"], info["tags"]) == (user, [])
    assert rabbit.admin.permissions_of(user) == [
        {"user": user, "vhost": rabbit.granted_vhost, **PERMISSIONS}
    ]

    # Publish and consume where the role allows it.
    body = b"order 42 for i-mq-use"
    assert await asyncio.to_thread(_round_trip, rabbit.granted_vhost, user, password, body) == body
    # A queue outside the permission patterns, in the same vhost: refused.
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        await asyncio.to_thread(_declare_outside_the_grant, rabbit.granted_vhost, user, password)
    assert (refused.value.reply_code, refused.value.reply_text) == (
        403,
        f"ACCESS_REFUSED - access to queue 'other.jobs' in vhost "
        f"'{rabbit.granted_vhost}' refused for user '{user}'",
    )
    # A vhost the role does not name: the connection is refused.
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError) as denied:
        await asyncio.to_thread(_connect, rabbit.refused_vhost, user, password)
    assert denied.value.args == (
        f'ConnectionClosedByBroker: (530) "NOT_ALLOWED - access to vhost '
        f"'{rabbit.refused_vhost}' refused for user '{user}'\"",
    )
    # A wrong password: refused as a login.
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as wrong:
        await asyncio.to_thread(_connect, rabbit.granted_vhost, user, password + "x")
    assert wrong.value.args == (LOGIN_REFUSED,)

    # The store keeps the lease and the login's name as its credential_ref, never the
    # password.
    dump, refs = store_without_refs(b)
    assert password not in dump and user not in dump
    assert {"username": user} in refs and password not in repr(refs)


async def test_termination_deletes_the_user_and_cuts_its_open_connection(
    make_broker, http, vault, rabbit
):
    b = await make_broker(
        extra_roles={"mq": rabbit.broker_role()}, instance_policies=(rabbit.policy,)
    )
    status, cred = await issue(http, b, "i-mq-term", "mq")
    assert status == 201, cred
    assert 590 <= _lifetime(cred) <= 600  # the role's default_ttl
    user, password = cred["data"]["username"], cred["data"]["password"]
    held = await asyncio.to_thread(_connect, rabbit.granted_vhost, user, password)
    try:
        [tok] = b.rows("instance_tokens")
        async with http.post(
            f"{b.url}/v1/instances/i-mq-term/terminate", headers=b.admin()
        ) as resp:
            assert resp.status == 202, await resp.text()
        shown = await wait_job(http, b, "i-mq-term")
        assert (shown["state"], shown["job"]["state"]) == ("terminated", "done")
        assert [x["state"] for x in shown["leases"]] == ["revoked"]

        # The user is gone from RabbitMQ, and so is the connection it had open.
        assert rabbit.admin.user_info(user) is None
        assert user not in rabbit.admin.users()
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as cut:
            await asyncio.to_thread(held.process_data_events, 1)
        assert (cut.value.reply_code, cut.value.reply_text) == (
            320,
            f"CONNECTION_FORCED - user '{user}' is deleted",
        )
    finally:
        if held.is_open:
            await asyncio.to_thread(held.close)
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as refused:
        await asyncio.to_thread(_connect, rabbit.granted_vhost, user, password)
    assert refused.value.args == (LOGIN_REFUSED,)

    [lease] = b.rows("leases")
    assert not vault.lease_exists(lease["vault_lease_id"])
    assert not vault.accessor_alive(tok["accessor"])
    status, body = await issue(http, b, "i-mq-term", "mq")
    assert (status, body["error"]["code"]) == (409, "instance_terminated")


async def test_renewal_sets_the_lease_as_asked_and_release_deletes_the_user(
    make_broker, http, vault, rabbit
):
    b = await make_broker(
        extra_roles={"mq": rabbit.broker_role()}, instance_policies=(rabbit.policy,)
    )
    status, cred = await issue(http, b, "i-mq-renew", "mq", ttl="2m")
    assert status == 201, cred
    user = cred["data"]["username"]
    token = bearer(b.token("i-mq-renew"))
    async with http.post(
        f"{b.url}/v1/leases/{cred['lease_id']}/renew", headers=token, json={"ttl": "20m"}
    ) as resp:
        assert resp.status == 200, await resp.text()
        renewed = await resp.json()
    left = datetime.fromisoformat(renewed["expires_at"]) - datetime.now(UTC)
    assert timedelta(minutes=19) < left <= timedelta(minutes=20)
    assert (
        datetime.fromisoformat(renewed["max_expires_at"])
        - datetime.fromisoformat(cred["issued_at"])
    ) == timedelta(hours=1)
    [lease] = b.rows("leases")
    status, looked = vault.call("PUT", "sys/leases/lookup", {"lease_id": lease["vault_lease_id"]})
    assert status == 200 and 1140 < looked["data"]["ttl"] <= 1200

    async with http.delete(f"{b.url}/v1/leases/{cred['lease_id']}", headers=token) as resp:
        assert resp.status == 204, await resp.text()
    assert rabbit.admin.user_info(user) is None
    [lease] = b.rows("leases")
    assert lease["state"] == "released" and not vault.lease_exists(lease["vault_lease_id"])
