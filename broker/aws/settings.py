"""The ``aws`` section (the broker's own access to AWS) and the credential and endpoint
settings the other AWS-facing sections (``events.sqs``) share."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator

from broker.settings import Frozen, require_tls_off_loopback


class AwsDefaultChain(Frozen):
    """The AWS SDK's standard chain: environment, shared files, web identity, container
    and instance roles. The one place the broker's AWS credentials come from outside
    this file, by design of the chain."""

    method: Literal["chain"] = "chain"


class AwsStaticKeys(Frozen):
    method: Literal["static"]
    access_key_id: str = Field(min_length=16, max_length=128, pattern=r"^[A-Za-z0-9_]+$")
    secret_access_key: SecretStr
    session_token: SecretStr | None = None


_AWS_REGION = re.compile(r"^[a-z]{2,4}(-[a-z]+)+-\d{1,2}\Z")
_IAM_NAME = re.compile(r"^[A-Za-z0-9+=,.@_-]{1,128}\Z")


def aws_region(v: str) -> str:
    if not _AWS_REGION.match(v):
        raise ValueError("expected an AWS region such as us-east-1")
    return v


def endpoint_url(v: str | None) -> str | None:
    if v is None:
        return v
    if not re.match(r"^https?://[^/\s?#]+/?\Z", v):
        raise ValueError("expected http(s)://host[:port] with no path")
    return require_tls_off_loopback(v.rstrip("/"))


class AwsSettings(Frozen):
    """The broker's own access to AWS: STS for web-identity exchanges (unsigned), IAM for
    the deny policy that stands in for revoking an STS session (signed, with these
    credentials; they need iam:GetRole, iam:GetRolePolicy and iam:PutRolePolicy on the
    roles the broker's web_identity roles assume)."""

    region: str = "us-east-1"
    sts_endpoint: str | None = None  # default https://sts.<region>.amazonaws.com
    iam_endpoint: str | None = None  # default the SDK's (https://iam.amazonaws.com)
    ec2_endpoint: str | None = None  # the aws_ec2 liveness check; default the SDK's
    credentials: Annotated[AwsDefaultChain | AwsStaticKeys, Field(discriminator="method")] = (
        AwsDefaultChain()
    )
    timeout_s: float = Field(10.0, gt=0, le=120)
    iam_concurrency: int = Field(4, ge=1, le=32)  # threads for the (synchronous) IAM SDK
    # The inline policy on each IAM role that holds the denies of revoked sessions.
    revoked_sessions_policy: str = "broker-revoked-sessions"

    _endpoints = field_validator("sts_endpoint", "iam_endpoint", "ec2_endpoint")(endpoint_url)

    _region = field_validator("region")(aws_region)

    @field_validator("revoked_sessions_policy")
    @classmethod
    def _policy_name(cls, v: str) -> str:
        if not _IAM_NAME.match(v):
            raise ValueError("expected an IAM policy name (letters, digits, + = , . @ _ -)")
        return v

    @property
    def sts_url(self) -> str:
        return self.sts_endpoint or f"https://sts.{self.region}.amazonaws.com"
