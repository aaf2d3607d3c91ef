"""EC2 state-change events from SQS terminate instances on the real broker (PostgreSQL,
OpenBao), with SQS and EC2 played by moto in server mode on loopback; and the aws_ec2
liveness check against moto's EC2."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from broker.aws.settings import AwsSettings
from broker.clock import FixedClock
from broker.dev.openbao import free_port
from broker.errors import StoreUnavailable, UpstreamRejected, UpstreamUnavailable
from broker.events.settings import SqsEventSettings
from broker.events.sqs import SqsTerminationSource
from broker.identity.model import Identity
from broker.liveness.ec2 import Ec2Liveness, ec2_instance_id
from broker.logs import JsonFormatter
from tests.harness.api import issue, wait_job
from tests.harness.moto import ACCESS_KEY_ID, ACCOUNT, REGION, SECRET_ACCESS_KEY, MotoServer
from tests.harness.proxy import FaultProxy
from tests.harness.wait import eventually

VISIBILITY_S = 5  # the smallest the settings allow
STATIC_KEYS = {"method": "static", "access_key_id": ACCESS_KEY_ID,
               "secret_access_key": SECRET_ACCESS_KEY}


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@dataclass
class Queue:
    sqs: Any
    url: str

    def send(self, body: str) -> None:
        self.sqs.send_message(QueueUrl=self.url, MessageBody=body)

    def counts(self) -> tuple[int, int]:
        """(visible, in flight) messages."""
        attrs = self.sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return (int(attrs["ApproximateNumberOfMessages"]),
                int(attrs["ApproximateNumberOfMessagesNotVisible"]))


@pytest.fixture
def queue(moto: MotoServer) -> Iterator[Queue]:
    sqs = moto.client("sqs")
    url = sqs.create_queue(QueueName=f"ec2-events-{secrets.token_hex(4)}")["QueueUrl"]
    yield Queue(sqs, url)
    sqs.delete_queue(QueueUrl=url)


def sqs_settings(moto: MotoServer, queue: Queue, **kw: Any) -> SqsEventSettings:
    values: dict[str, Any] = {"queue_url": queue.url, "region": REGION, "endpoint": moto.url,
                              "credentials": STATIC_KEYS, "wait_time_s": 0,
                              "visibility_timeout_s": VISIBILITY_S, "issuer": "dev"}
    values.update(kw)
    return SqsEventSettings.model_validate(values)


@pytest.fixture
async def sources() -> AsyncIterator[list[SqsTerminationSource]]:
    made: list[SqsTerminationSource] = []
    yield made
    for source in made:
        await source.close()


def new_source(sources: list[SqsTerminationSource], settings: SqsEventSettings,
               terminate: Any, **kw: Any) -> SqsTerminationSource:
    source = SqsTerminationSource(settings, terminate, **kw)
    sources.append(source)
    return source


def ec2_id() -> str:
    return "i-" + secrets.token_hex(8)


def state_change(instance: str, state: str, *, account: str = ACCOUNT,
                 region: str = REGION) -> str:
    return json.dumps({
        "version": "0", "id": "7bf73129-1428-4cd3-a780-95db273d1602",
        "detail-type": "EC2 Instance State-change Notification", "source": "aws.ec2",
        "account": account, "time": "2025-01-01T00:00:00Z", "region": region,
        "resources": [f"arn:aws:ec2:{region}:{account}:instance/{instance}"],
        "detail": {"instance-id": instance, "state": state}})


async def leased_instance(http: Any, b: Any) -> tuple[str, str]:
    """A fresh EC2-shaped instance holding one database login; (instance, Vault lease id)."""
    instance = ec2_id()
    status, cred = await issue(http, b, instance, "dev-db")
    assert status == 201, cred
    [lease] = [r for r in b.rows("leases") if r["instance_id"] == instance]
    return instance, lease["vault_lease_id"]


def jobs_of(b: Any, instance: str) -> list[dict[str, Any]]:
    return [r for r in b.rows("revocation_jobs") if r["instance_id"] == instance]


def instance_state(b: Any, instance: str) -> str:
    [row] = [r for r in b.rows("instances") if r["instance_id"] == instance]
    return row["state"]


async def handle_all(source: Any, count: int) -> None:
    """Receive until ``count`` messages are handled: SQS may hand out a batch in parts."""
    handled = 0

    async def all_handled() -> bool:
        nonlocal handled
        handled += await source.run_once()
        return handled >= count

    await eventually(all_handled, lambda: f"{handled} of {count} messages handled")
    assert handled == count


# -- termination --------------------------------------------------------------------------

@pytest.mark.parametrize("state", ["terminated", "shutting-down"])
async def test_a_termination_event_revokes_the_instances_leases(
        make_broker, http, vault, moto, queue, sources, state):
    b = await make_broker()
    instance, vault_lease = await leased_instance(http, b)
    assert vault.lease_exists(vault_lease)
    source = new_source(sources, sqs_settings(moto, queue), b.broker.components.terminate)

    queue.send(state_change(instance, state))
    assert await source.run_once() == 1

    assert source.stats == {"terminated": 1}
    [job] = jobs_of(b, instance)
    assert job["requested_by"] == "events:sqs"
    assert queue.counts() == (0, 0)  # acknowledged only now that the job is durable
    shown = await wait_job(http, b, instance)
    assert (shown["state"], shown["job"]["state"]) == ("terminated", "done")
    assert [r["state"] for r in b.rows("leases") if r["instance_id"] == instance] == ["revoked"]
    assert not vault.lease_exists(vault_lease)
    # Tombstoned: the instance gets nothing new.
    status, body = await issue(http, b, instance, "dev-db")
    assert (status, body["error"]["code"]) == (409, "instance_terminated")


async def test_running_is_ignored_malformed_is_dropped_and_neither_is_logged(
        make_broker, http, vault, moto, queue, sources, caplog):
    b = await make_broker()
    instance, vault_lease = await leased_instance(http, b)
    source = new_source(sources, sqs_settings(moto, queue, max_messages=10),
                        b.broker.components.terminate)
    handles: list[str] = []
    source._queue._client().meta.events.register(  # the receipt handles, to look for in logs
        "after-call.sqs.ReceiveMessage",
        lambda parsed, **_: handles.extend(m["ReceiptHandle"] for m in parsed.get("Messages", [])))
    marker = "secret-marker-" + secrets.token_hex(8)
    bodies = [
        state_change(instance, "running"),
        state_change(instance, "stopped"),
        f"not json {marker}",
        state_change(instance, "terminated").replace("aws.ec2", "my.app"),
        state_change(f"i-123/../{marker}", "terminated"),
    ]
    for raw in bodies:
        queue.send(raw)
    caplog.set_level(logging.DEBUG, logger="broker.events")

    await handle_all(source, len(bodies))
    assert source.stats == {"ignored": 2, "malformed": 3}
    assert queue.counts() == (0, 0)
    assert jobs_of(b, instance) == []
    assert instance_state(b, instance) == "active"
    assert vault.lease_exists(vault_lease)
    status, _ = await issue(http, b, instance, "dev-db")
    assert status == 201

    lines = [JsonFormatter().format(r) for r in caplog.records if r.name.startswith("broker.")]
    assert sum("malformed" in line for line in lines) == 3
    assert len(handles) == len(bodies)
    for line in lines:
        assert marker not in line and "not json" not in line
        assert not any(h in line for h in handles)


async def test_duplicate_events_make_one_job(make_broker, http, vault, moto, queue, sources):
    b = await make_broker()
    instance, vault_lease = await leased_instance(http, b)
    source = new_source(sources, sqs_settings(moto, queue), b.broker.components.terminate)
    for state in ("shutting-down", "terminated", "terminated", "terminated"):
        queue.send(state_change(instance, state))

    await handle_all(source, 4)
    assert source.stats == {"terminated": 4}
    assert len(jobs_of(b, instance)) == 1
    assert queue.counts() == (0, 0)
    # Once more after the job ran: still the one job, done.
    await wait_job(http, b, instance)
    queue.send(state_change(instance, "terminated"))
    assert await source.run_once() == 1
    [job] = jobs_of(b, instance)
    assert job["state"] == "done"
    assert not vault.lease_exists(vault_lease)


async def test_an_unreachable_store_keeps_the_message_until_the_job_is_recorded(
        make_broker, pg, http, vault, moto, queue, sources):
    proxy = FaultProxy(pg.host, pg.port)
    await proxy.start()
    name = await asyncio.to_thread(pg.create_database)
    b = None
    try:
        b = await make_broker(store_url=f"postgresql://postgres@127.0.0.1:{proxy.port}/{name}")
        # The test reads tables around the proxy: a blocking read through it would stall
        # the event loop the proxy runs on.
        direct = dataclasses.replace(b, store_url=pg.url(name))
        instance, vault_lease = await leased_instance(http, direct)
        source = new_source(sources, sqs_settings(moto, queue), b.broker.components.terminate)
        queue.send(state_change(instance, "terminated"))

        proxy.cut()
        assert await source.run_once() == 1
        assert source.stats == {"failed": 1}
        assert queue.counts() == (0, 1)  # not deleted: in flight until the visibility timeout
        assert await source.run_once() == 0

        proxy.restore()
        loop = asyncio.get_running_loop()
        cut_at = loop.time()

        async def delivered_again() -> bool:
            await source.run_once()
            return source.stats["terminated"] > 0

        await eventually(delivered_again, "the message delivered again",
                         timeout=VISIBILITY_S + 10, interval=0.2)
        assert loop.time() - cut_at >= VISIBILITY_S - 1  # it came back by the timeout
        assert source.stats == {"failed": 1, "terminated": 1}
        assert len(jobs_of(direct, instance)) == 1
        assert queue.counts() == (0, 0)
        shown = await wait_job(http, b, instance)
        assert shown["job"]["state"] == "done"
        assert not vault.lease_exists(vault_lease)
    finally:
        if b is not None:
            await b.broker.stop()  # before its database goes (make_broker stops it again)
        await proxy.stop()
        await asyncio.to_thread(pg.drop_database, name)


@pytest.mark.parametrize("error", [StoreUnavailable("down"), RuntimeError("bug"),
                                   UpstreamUnavailable("vault down")],
                         ids=["store-unavailable", "unexpected-exception", "other-broker-error"])
async def test_a_failing_terminate_never_deletes_the_message(moto, queue, sources, error):
    calls: list[tuple[str, str, str | None]] = []

    async def terminate(instance_id: str, *, actor: str, issuer: str | None = None) -> Any:
        calls.append((instance_id, actor, issuer))
        raise error

    source = new_source(sources, sqs_settings(moto, queue, instance_id_format=(
        "aws:{account}:{region}:{instance_id}")), terminate)
    instance = ec2_id()
    queue.send(state_change(instance, "terminated"))
    assert await source.run_once() == 1
    assert calls == [(f"aws:{ACCOUNT}:{REGION}:{instance}", "events:sqs", "dev")]
    assert source.stats == {"failed": 1}
    assert queue.counts() == (0, 1)


async def test_an_instance_of_another_issuer_is_refused_and_left_alone(
        make_broker, http, vault, moto, queue, sources):
    b = await make_broker()
    instance, vault_lease = await leased_instance(http, b)  # the dev issuer's
    source = new_source(sources, sqs_settings(moto, queue, issuer="other-cloud"),
                        b.broker.components.terminate)
    queue.send(state_change(instance, "terminated"))

    assert await source.run_once() == 1
    assert source.stats == {"refused": 1}
    assert queue.counts() == (0, 0)  # nothing will ever come of it
    assert jobs_of(b, instance) == []
    assert instance_state(b, instance) == "active"
    assert vault.lease_exists(vault_lease)
    status, _ = await issue(http, b, instance, "dev-db")
    assert status == 201


# -- the loop -----------------------------------------------------------------------------

async def test_run_handles_events_and_stops_promptly_during_a_long_poll(
        make_broker, http, vault, moto, queue, sources, monkeypatch):
    b = await make_broker()
    instance, vault_lease = await leased_instance(http, b)
    source = new_source(sources, sqs_settings(moto, queue, wait_time_s=20),
                        b.broker.components.terminate)
    # Count the receives the loop starts, to wait for a long poll to be in flight rather
    # than sleep and hope it is (on a busy machine it may not have started yet).
    receives = 0
    receive = source._queue.receive

    def counted(*args: Any) -> Any:
        nonlocal receives
        receives += 1
        return receive(*args)

    monkeypatch.setattr(source._queue, "receive", counted)
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(stop))
    try:
        await eventually(lambda: receives >= 1, "a long poll in flight")
        queue.send(state_change(instance, "terminated"))
        await eventually(lambda: source.stats["terminated"] == 1, "event handled")
        await eventually(lambda: receives >= 2, "the next 20 s long poll in flight")
        loop = asyncio.get_running_loop()
        stopped_at = loop.time()
        stop.set()
        # Prompt is well within the 20 s the long poll would hold; the bound leaves room
        # for a busy machine.
        await asyncio.wait_for(task, 10)
        assert loop.time() - stopped_at < 10
    finally:
        stop.set()
        # Let moto answer the abandoned long poll now rather than in 20 s.
        queue.send(state_change(ec2_id(), "running"))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert not task.cancelled() and task.exception() is None
    await wait_job(http, b, instance)
    assert not vault.lease_exists(vault_lease)


async def test_a_failing_poll_backs_off_and_the_loop_survives(sources):
    dead = free_port()  # nothing listens there
    settings = SqsEventSettings.model_validate({
        "queue_url": f"http://127.0.0.1:{dead}/{ACCOUNT}/gone", "region": REGION,
        "endpoint": f"http://127.0.0.1:{dead}", "credentials": STATIC_KEYS, "wait_time_s": 0})

    async def terminate(instance_id: str, *, actor: str, issuer: str | None = None) -> Any:
        raise AssertionError("no message can arrive")

    source = new_source(sources, settings, terminate, backoff_base_s=0.05, backoff_max_s=0.2)
    with pytest.raises(UpstreamUnavailable):
        await source.run_once()
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(stop))
    await eventually(lambda: source.errors["receive"] >= 3, "polls retried")
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 30)
    assert task.exception() is None


async def test_a_missing_queue_is_a_configuration_error(moto, queue, sources):
    settings = sqs_settings(moto, queue)
    queue.sqs.delete_queue(QueueUrl=queue.url)

    async def terminate(instance_id: str, *, actor: str, issuer: str | None = None) -> Any:
        raise AssertionError("no message can arrive")

    source = new_source(sources, settings, terminate)
    with pytest.raises(UpstreamRejected) as err:
        await source.run_once()
    assert err.value.code == "sqs_queue_missing"
    queue.sqs.create_queue(QueueName=queue.url.rsplit("/", 1)[1])  # for the fixture's cleanup


async def test_the_broker_runs_the_source_from_its_settings(make_broker, http, vault, moto,
                                                            queue):
    b = await make_broker(overrides={"events": {"sqs": {
        "queue_url": queue.url, "region": REGION, "endpoint": moto.url,
        "credentials": STATIC_KEYS, "wait_time_s": 1, "visibility_timeout_s": VISIBILITY_S,
        "issuer": "dev"}}})
    [source] = [s for s in b.broker.components.sources if isinstance(s, SqsTerminationSource)]
    instance, vault_lease = await leased_instance(http, b)
    queue.send(state_change(instance, "terminated"))

    shown = await wait_job(http, b, instance)
    assert shown["job"]["state"] == "done"
    assert jobs_of(b, instance)[0]["requested_by"] == "events:sqs"
    assert not vault.lease_exists(vault_lease)
    await eventually(lambda: queue.counts() == (0, 0), "message deleted")
    assert source.stats["terminated"] == 1


# -- the aws_ec2 liveness check -----------------------------------------------------------

def identity(instance_id: str) -> Identity:
    now = datetime.now(UTC)
    return Identity(issuer_name="ec2", issuer="https://issuer.test", subject="w",
                    instance_id=instance_id, workload="w", issued_at=now, expires_at=now,
                    claims={})


@pytest.mark.parametrize(("instance_id", "expected"), [
    ("i-0123456789abcdef0", "i-0123456789abcdef0"),
    ("i-abcd1111", "i-abcd1111"),
    (f"aws:{ACCOUNT}:{REGION}:i-abcd1111", "i-abcd1111"),
    (f"{ACCOUNT}:i-abcd1111", "i-abcd1111"),
    (f"aws:{ACCOUNT}:eu-west-1:i-abcd1111", None),
    ("i-abcd1111:aws", None),
    ("i-ABCD1111", None),
    ("i-abcd111", None),
    ("i-0123456789abcdef01", None),
    ("i-abcd1111\n", None),
    ("\u0456-abcd1111", None),
    ("3f2a9c1e-7d4b-4c8e-9f0a-1b2c3d4e5f60", None),
    ("", None),
], ids=["plain-17", "plain-8", "account-region-prefix", "account-prefix", "other-region",
        "id-not-last", "upper-case", "too-short", "too-long", "trailing-newline", "cyrillic-i",
        "pod-uid", "empty"])
def test_the_ec2_id_in_a_broker_instance_id(instance_id: str, expected: str | None) -> None:
    assert ec2_instance_id(instance_id, REGION) == expected


@pytest.fixture
async def liveness(moto) -> AsyncIterator[tuple[Ec2Liveness, FixedClock, list[str]]]:
    clock = FixedClock(datetime(2025, 1, 1, tzinfo=UTC))
    settings = AwsSettings.model_validate({"region": REGION, "ec2_endpoint": moto.url,
                                           "sts_endpoint": moto.url,
                                           "credentials": STATIC_KEYS, "timeout_s": 5})
    check = Ec2Liveness(settings, clock, cache_s=10)
    await check.start()
    asked: list[str] = []
    check._instances._ec2.meta.events.register(  # count the calls EC2 sees, to prove the cache
        "provide-client-params.ec2.DescribeInstances",
        lambda params, **_: asked.extend(params["InstanceIds"]))
    yield check, clock, asked
    await check.close()


async def test_ec2_liveness_follows_the_instance_and_caches(moto, liveness):
    check, clock, asked = liveness
    ec2 = moto.client("ec2")
    instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)[
        "Instances"][0]["InstanceId"]

    assert await check.alive(identity(instance)) is True  # pending
    ec2.stop_instances(InstanceIds=[instance])
    assert await check.alive(identity(instance)) is True  # cached
    assert asked == [instance]
    clock.advance(11)
    assert await check.alive(identity(instance)) is True  # stopped is alive
    ec2.terminate_instances(InstanceIds=[instance])
    assert await check.alive(identity(instance)) is True  # cached
    clock.advance(11)
    assert await check.alive(identity(instance)) is False  # terminated
    clock.advance(10 ** 6)
    assert await check.alive(identity(instance)) is False  # gone for good: not asked again
    assert asked == [instance] * 3
    # The broker's id may carry account and region before the EC2 id.
    other = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)[
        "Instances"][0]["InstanceId"]
    assert await check.alive(identity(f"aws:{ACCOUNT}:{REGION}:{other}")) is True


async def test_ec2_liveness_answers(moto, liveness):
    check, _, asked = liveness
    unknown = "i-0123456789abcdef0"
    # InvalidInstanceID.NotFound for an id that names no account: it may be another
    # account's, or launched a moment ago; only "terminated" (or our own account's "not
    # found") proves an instance gone.
    assert await check.alive(identity(unknown)) is None
    assert asked == [unknown]
    for not_ec2 in ("pod-3f2a9c", "i-123/../x", "i-ABCDEF12", "i-0123456789abcdef0:x",
                    f"aws:{ACCOUNT}:eu-west-1:i-0123456789abcdef1"):
        assert await check.alive(identity(not_ec2)) is None, not_ec2
    assert asked == [unknown]  # none of those reached EC2

    # An id that names an account is asked about only in the broker's own (STS says
    # moto's): another account's "not found" would not mean "gone".
    assert await check.alive(identity(f"aws:{ACCOUNT}:{REGION}:{unknown}")) is False
    assert await check.alive(identity(f"aws:999999999999:{REGION}:{unknown}")) is None
    assert await check.alive(identity(f"{ACCOUNT}:999999999999:{unknown}")) is None
    assert asked == [unknown, unknown]

    # Concurrent checks of one instance share one call.
    fresh = moto.client("ec2").run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)[
        "Instances"][0]["InstanceId"]
    answers = await asyncio.gather(*(check.alive(identity(fresh)) for _ in range(5)))
    assert answers == [True] * 5
    assert asked == [unknown, unknown, fresh]


async def test_ec2_liveness_cannot_tell_when_ec2_is_unreachable():
    settings = AwsSettings.model_validate({
        "region": REGION, "ec2_endpoint": f"http://127.0.0.1:{free_port()}",
        "credentials": STATIC_KEYS, "timeout_s": 1})
    check = Ec2Liveness(settings, FixedClock(datetime(2025, 1, 1, tzinfo=UTC)), cache_s=0)
    await check.start()
    try:
        assert await check.alive(identity("i-0123456789abcdef0")) is None
    finally:
        await check.close()
    # Closed: still an answer, not an exception.
    assert await check.alive(identity("i-0123456789abcdef0")) is None


async def test_ec2_liveness_eviction_keeps_each_answer_with_its_own_instance(
        moto, liveness, monkeypatch):
    from broker.liveness import ec2

    monkeypatch.setattr(ec2, "MAX_CACHED", 3)
    check, clock, _ = liveness
    ec2 = moto.client("ec2")
    running = [ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)[
        "Instances"][0]["InstanceId"] for _ in range(3)]
    gone = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)[
        "Instances"][0]["InstanceId"]
    ec2.terminate_instances(InstanceIds=[gone])
    for instance in running:
        assert await check.alive(identity(instance)) is True
    clock.advance(11)  # the cached answers expire; the cache is full
    assert await check.alive(identity(gone)) is False
    for instance in running:  # a gone answer never lands on another instance
        assert await check.alive(identity(instance)) is True, instance
