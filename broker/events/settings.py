"""The ``events`` section: the termination sources that are configured (the signed
webhook and EC2 events from SQS; the pod watch is in the ``kubernetes`` section)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, SecretStr, field_validator

from broker.aws.settings import AwsDefaultChain, AwsStaticKeys, aws_region, endpoint_url
from broker.settings import Frozen, require_tls_off_loopback, template_fields


class WebhookSettings(Frozen):
    """``POST /v1/events/terminate``: an HMAC-SHA256 signature over ``<timestamp>.<body>``
    with one of ``secrets`` (several, to rotate); a timestamp outside ``window_s`` of the
    broker's clock is refused, and a signature is accepted once."""

    secrets: tuple[SecretStr, ...] = Field(min_length=1, max_length=8)
    window_s: int = Field(300, ge=10, le=3600)
    max_instances: int = Field(100, ge=1, le=1000)

    @field_validator("secrets")
    @classmethod
    def _long_enough(cls, v: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        if any(len(x.get_secret_value()) < 32 for x in v):
            raise ValueError("each webhook secret must be at least 32 characters")
        return v


class SqsEventSettings(Frozen):
    """EventBridge "EC2 Instance State-change Notification" messages in an SQS queue."""

    queue_url: str
    region: str = "us-east-1"
    endpoint: str | None = None  # default the SDK's
    credentials: Annotated[AwsDefaultChain | AwsStaticKeys, Field(discriminator="method")] = (
        AwsDefaultChain()
    )
    wait_time_s: int = Field(20, ge=0, le=20)  # SQS long polling
    max_messages: int = Field(10, ge=1, le=10)
    visibility_timeout_s: int = Field(60, ge=5, le=43200)
    states: tuple[str, ...] = ("shutting-down", "terminated")
    # The broker's instance id for an EC2 instance: fields instance_id, account, region.
    instance_id_format: str = "{instance_id}"
    # The issuer whose instances these are: an instance owned by another issuer is left alone.
    issuer: str | None = None

    _endpoints = field_validator("endpoint")(endpoint_url)

    @field_validator("queue_url")
    @classmethod
    def _queue(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+/\d{12}/[A-Za-z0-9_-]{1,80}(\.fifo)?\Z", v):
            raise ValueError(
                "expected an SQS queue URL like https://sqs.REGION.amazonaws.com/ACCOUNT/NAME"
            )
        return require_tls_off_loopback(v)

    _region = field_validator("region")(aws_region)

    @field_validator("states")
    @classmethod
    def _states(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        known = ("pending", "running", "stopping", "stopped", "shutting-down", "terminated")
        if not v or set(v) - set(known):
            raise ValueError(f"expected EC2 instance states among {', '.join(known)}")
        return v

    @field_validator("instance_id_format")
    @classmethod
    def _format(cls, v: str) -> str:
        unknown = template_fields(v) - {"instance_id", "account", "region"}
        if unknown or "instance_id" not in template_fields(v):
            raise ValueError(
                "expected a template with {instance_id}, and optionally {account} and {region}"
            )
        return v


class EventSettings(Frozen):
    webhook: WebhookSettings | None = None
    sqs: SqsEventSettings | None = None
