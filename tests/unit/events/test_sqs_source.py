"""The SQS termination source's decisions over what its queue hands it, with the SQS
client replaced: which messages are deleted, and which failed calls are counted. The
calls themselves run against moto in tests/integration/test_sqs_events.py."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from broker.errors import StoreUnavailable, UpstreamRejected, UpstreamUnavailable
from broker.events.settings import SqsEventSettings
from broker.events.sqs import SqsTerminationSource

QUEUE_URL = "https://sqs.us-east-1.amazonaws.com/123456789012/ec2-events"


class FakeQueue:
    def __init__(self, messages: list[dict[str, Any]] | Exception) -> None:
        self.messages = messages
        self.deleted: list[list[str]] = []
        self.closed = False

    async def receive(self, max_messages: int, wait_s: int,
                      visibility_timeout_s: int) -> list[dict[str, Any]]:
        if isinstance(self.messages, Exception):
            raise self.messages
        return self.messages

    async def delete(self, receipts: list[str]) -> list[tuple[int, str]]:
        self.deleted.append(receipts)
        return []

    async def close(self) -> None:
        self.closed = True


def message(n: int, state: str) -> dict[str, Any]:
    return {"MessageId": f"m-{n}", "ReceiptHandle": f"r-{n}", "Body": json.dumps({
        "id": "7bf73129-1428-4cd3-a780-95db273d1602", "source": "aws.ec2",
        "detail-type": "EC2 Instance State-change Notification", "account": "123456789012",
        "region": "us-east-1", "detail": {"instance-id": f"i-abcd111{n}", "state": state}})}


def source_with(queue: FakeQueue, terminate: Any) -> SqsTerminationSource:
    settings = SqsEventSettings.model_validate({"queue_url": QUEUE_URL, "issuer": "dev"})
    return SqsTerminationSource(settings, terminate, queue=queue)  # type: ignore[arg-type]


async def test_only_messages_that_failed_stay_in_the_queue() -> None:
    async def terminate(instance_id: str, *, actor: str, issuer: str | None = None) -> Any:
        if instance_id == "i-abcd1112":
            raise StoreUnavailable("down")
        return SimpleNamespace(job_id=1, state="pending")

    queue = FakeQueue([message(1, "terminated"), message(2, "terminated"),
                       message(3, "running"), {"MessageId": "m-4", "ReceiptHandle": "r-4",
                                               "Body": "not json"}])
    source = source_with(queue, terminate)
    assert await source.run_once() == 4
    assert source.stats == {"terminated": 1, "failed": 1, "ignored": 1, "malformed": 1}
    assert queue.deleted == [["r-1", "r-3", "r-4"]]


@pytest.mark.parametrize("error", [UpstreamUnavailable("down", code="aws_unavailable"),
                                   UpstreamRejected("gone", code="sqs_queue_missing")],
                         ids=["unavailable", "rejected"])
async def test_a_failed_receive_is_counted_and_raised(error: Exception) -> None:
    async def terminate(instance_id: str, *, actor: str, issuer: str | None = None) -> Any:
        raise AssertionError("no message arrived")

    source = source_with(FakeQueue(error), terminate)
    with pytest.raises(type(error)):
        await source.run_once()
    assert source.errors == {"receive": 1}


async def test_a_closed_source_refuses_without_counting() -> None:
    async def terminate(instance_id: str, *, actor: str, issuer: str | None = None) -> Any:
        raise AssertionError("no message arrived")

    queue = FakeQueue([])
    source = source_with(queue, terminate)
    await source.close()
    with pytest.raises(UpstreamUnavailable):
        await source.run_once()
    assert queue.closed and source.errors == {}
