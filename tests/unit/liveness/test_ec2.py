"""The ``aws_ec2`` liveness check's decisions over EC2's answers, with the EC2 client
replaced: what "not found" proves, which account is asked about, and what a failure
answers. The calls themselves run against moto in tests/integration/test_sqs_events.py."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from broker.aws.ec2 import InstanceState
from broker.aws.settings import AwsSettings
from broker.clock import FixedClock
from broker.errors import UpstreamRejected, UpstreamUnavailable
from broker.identity.model import Identity
from broker.liveness.ec2 import Ec2Liveness

OURS = "123456789012"
REGION = "us-east-1"
EC2_ID = "i-0123456789abcdef0"


class FakeInstances:
    def __init__(self, answer: InstanceState | Exception, account: str | None = OURS) -> None:
        self.answer = answer
        self.account = account
        self.asked: list[str] = []
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.started = False

    async def own_account(self) -> str | None:
        return self.account

    async def state(self, instance: str) -> InstanceState:
        self.asked.append(instance)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def identity(instance_id: str) -> Identity:
    now = datetime.now(UTC)
    return Identity(issuer_name="ec2", issuer="https://issuer.test", subject="w",
                    instance_id=instance_id, workload="w", issued_at=now, expires_at=now,
                    claims={})


async def check_with(instances: FakeInstances) -> Ec2Liveness:
    settings = AwsSettings.model_validate({"region": REGION})
    check = Ec2Liveness(settings, FixedClock(datetime(2025, 1, 1, tzinfo=UTC)), cache_s=10,
                        instances=instances)  # type: ignore[arg-type]
    await check.start()
    return check


@pytest.mark.parametrize(("instance_id", "expected"), [
    (EC2_ID, None),  # may be another account's, or launched a moment ago
    (f"aws:{OURS}:{REGION}:{EC2_ID}", False),  # ours: gone
])
async def test_not_found_proves_gone_only_in_the_brokers_own_account(
        instance_id: str, expected: bool | None) -> None:
    instances = FakeInstances(InstanceState(None, not_found=True))
    check = await check_with(instances)
    assert await check.alive(identity(instance_id)) is expected
    assert instances.asked == [EC2_ID]


@pytest.mark.parametrize("account", ["999999999999", None], ids=["another", "ours-unknown"])
async def test_another_accounts_instance_is_not_asked_about(account: str | None) -> None:
    instances = FakeInstances(InstanceState("terminated"), account=account)
    check = await check_with(instances)
    named = "999999999999" if account is None else OURS
    assert await check.alive(identity(f"aws:{named}:{REGION}:{EC2_ID}")) is None
    assert instances.asked == []


@pytest.mark.parametrize(("state", "expected"), [
    ("running", True), ("stopped", True), ("shutting-down", False), ("terminated", False),
    (None, None), ("rebooting", None),
])
async def test_the_state_answers(state: str | None, expected: bool | None) -> None:
    check = await check_with(FakeInstances(InstanceState(state)))
    assert await check.alive(identity(EC2_ID)) is expected


@pytest.mark.parametrize("error", [UpstreamRejected("refused", code="aws_ec2_rejected"),
                                   UpstreamUnavailable("down"), RuntimeError("bug")],
                         ids=["refused", "unreachable", "unexpected"])
async def test_a_failing_call_cannot_tell(error: Exception) -> None:
    check = await check_with(FakeInstances(error))
    assert await check.alive(identity(EC2_ID)) is None


async def test_a_check_not_started_cannot_tell_and_does_not_ask() -> None:
    instances = FakeInstances(InstanceState("running"))
    check = await check_with(instances)
    await check.close()
    assert await check.alive(identity(EC2_ID)) is None
    assert instances.asked == []

