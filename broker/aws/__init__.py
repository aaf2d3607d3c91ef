"""The AWS provider: every call the broker makes to AWS's own APIs, never to Vault. No
module outside this package imports boto3 or botocore.

Two things the broker does at AWS itself, because Vault cannot do them for it
(``broker.aws.client``):

- exchange an OIDC token that OpenBao's identity engine signed for an instance for an
  STS session (``AssumeRoleWithWebIdentity``, an unsigned call);
- stand in for revoking STS sessions, which AWS cannot do: on termination, an inline
  deny policy on the IAM role refuses every request of the instance's sessions issued
  before then (signed IAM calls, with the broker's own AWS credentials).

And the clients two capabilities use, which keep the decisions themselves:
``broker.aws.sqs.SqsQueue`` (receive and delete, for the SQS termination source in
``broker.events.sqs``) and ``broker.aws.ec2.Ec2Instances`` (an instance's state and the
broker's own account, for the ``aws_ec2`` liveness check in ``broker.liveness.ec2``).

The value types here are pure and shared with the engines; the modules named above do the
I/O (boto3 in bounded thread pools, set up one way by ``broker.aws.boto``). Errors leave
this package as ``UpstreamUnavailable`` / ``UpstreamRejected`` with ``aws_*`` (or
``sqs_*``) codes, or as plain answers (EC2's "not found"); nothing above it sees aiohttp
or botocore.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from broker.secret import Secret

# STS's own rules for a RoleSessionName and a role ARN (ASCII, not Python's Unicode \w).
SESSION_NAME = re.compile(r"^[A-Za-z0-9_+=,.@-]{2,64}\Z")
ROLE_ARN = re.compile(
    r"^arn:aws[a-z-]*:iam::\d{12}:role/(?:[\x21-\x7e]*/)?[A-Za-z0-9_+=,.@-]{1,64}\Z"
)
# Instance-id characters STS does not take, each mapped to one it takes that an accepted
# instance id may then not contain: the mapping stays one-to-one (GCP's project:instance,
# a Kubernetes namespace/name). Verified instance ids never hold '=' or ',' anyway; the
# check below keeps the mapping safe whatever the identity layer admits.
_SESSION_MAP = {":": "=", "/": ","}
STS_MIN_DURATION_S = 900  # AssumeRole*'s DurationSeconds minimum: 15 minutes


def session_name_for(instance_id: str) -> str:
    """The STS RoleSessionName of an instance: its id, or a one-to-one mapping of it into
    STS's alphabet. Raises ValueError when no unambiguous name exists."""
    if any(mapped in instance_id for mapped in _SESSION_MAP.values()):
        raise ValueError(
            "the instance id contains '=' or ',', which stand in for ':' and '/' in an STS "
            "session name; it cannot be mapped unambiguously"
        )
    name = "".join(_SESSION_MAP.get(c, c) for c in instance_id)
    if not SESSION_NAME.match(name):
        raise ValueError(
            "the instance id does not fit an STS session name (2 to 64 of letters, digits "
            "and _ + = , . @ -, with : and / mapped)"
        )
    return name


def iso_seconds(dt: datetime) -> str:
    """ISO 8601 UTC to the second, as AWS writes times (and IAM conditions compare them)."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class SessionRef:
    """Which STS sessions a lease stands for: those of ``session_name`` on ``role_arn``.
    Recorded with the lease before STS is asked, so that termination can deny them even if
    the broker died before it recorded the answer. Names no secret."""

    role_arn: str
    session_name: str

    KIND = "aws_sts_session"

    def __post_init__(self) -> None:
        if not ROLE_ARN.match(self.role_arn):
            raise ValueError("not an IAM role ARN")
        if not SESSION_NAME.match(self.session_name):
            raise ValueError("not an STS session name")

    def to_record(self) -> dict[str, str]:
        return {"kind": self.KIND, "role_arn": self.role_arn, "session_name": self.session_name}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SessionRef:
        if record.get("kind") != cls.KIND:
            raise ValueError(f"unknown external reference kind {record.get('kind')!r}")
        return cls(str(record.get("role_arn")), str(record.get("session_name")))

    @property
    def role_name(self) -> str:
        return self.role_arn.rsplit("/", 1)[1]


@dataclass(frozen=True)
class WebIdentityRequest:
    """One ``AssumeRoleWithWebIdentity`` call. ``token`` is the signed OIDC token."""

    role_arn: str
    session_name: str
    token: Secret
    duration_s: int
    policy: str | None = None  # a session policy (JSON), narrowing the role's permissions
    policy_arns: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (
            f"WebIdentityRequest(role_arn={self.role_arn!r}, "
            f"session_name={self.session_name!r}, token=***)"
        )


@dataclass(frozen=True)
class StsSession:
    """STS's answer. Only ``access_key_id``, the ARNs and the expiry are not secret."""

    access_key_id: str
    secret_access_key: Secret
    session_token: Secret
    expiration: datetime
    assumed_role_id: str  # <role id>:<session name>: what IAM conditions call aws:userid
    arn: str

    def __repr__(self) -> str:
        return f"StsSession(arn={self.arn!r}, expiration={iso_seconds(self.expiration)!r})"


__all__ = [
    "ROLE_ARN",
    "SESSION_NAME",
    "STS_MIN_DURATION_S",
    "SessionRef",
    "StsSession",
    "WebIdentityRequest",
    "iso_seconds",
    "session_name_for",
]
