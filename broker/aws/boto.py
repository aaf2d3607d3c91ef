"""boto3 sessions and client settings, built one way for every AWS client of the broker
(IAM for denies, SQS for termination events, EC2 and STS for liveness). Synchronous: the
callers run these clients in their own bounded thread pools, never on the event loop."""

from __future__ import annotations

import re

import boto3
import botocore.config

from broker.aws.settings import AwsDefaultChain, AwsStaticKeys

_AWS_CODE = re.compile(r"[A-Za-z0-9_.]{1,64}", re.ASCII)


def aws_session(credentials: AwsDefaultChain | AwsStaticKeys, region: str) -> boto3.Session:
    """Static keys from the configuration, or the SDK's default chain."""
    if isinstance(credentials, AwsStaticKeys):
        return boto3.session.Session(
            aws_access_key_id=credentials.access_key_id,
            aws_secret_access_key=credentials.secret_access_key.get_secret_value(),
            aws_session_token=credentials.session_token.get_secret_value()
            if credentials.session_token
            else None,
            region_name=region,
        )
    return boto3.session.Session(region_name=region)


def client_config(*, connect_s: float, read_s: float, pool: int) -> botocore.config.Config:
    """Bounded timeouts, two attempts at most (the callers retry on their own schedule),
    and as many pooled connections as the caller has threads."""
    return botocore.config.Config(
        connect_timeout=connect_s,
        read_timeout=read_s,
        retries={"mode": "standard", "max_attempts": 2},
        max_pool_connections=pool,
    )


def aws_code(value: object) -> str:
    """AWS's error code, fit for a log line: ``"unknown"`` unless it is code-shaped (an
    answer's code field is AWS's text, and could be anything)."""
    code = str(value)
    return code if _AWS_CODE.fullmatch(code) else "unknown"
