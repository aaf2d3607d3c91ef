"""EC2's view of instances, as the ``aws_ec2`` liveness check asks for it: the state of
one instance (DescribeInstances), and the account the broker's credentials belong to
(STS GetCallerIdentity), both in the ``aws`` section's region.

boto3 runs in a small thread pool, never on the event loop. Botocore failures are
translated here: EC2's "not found" is an answer (``InstanceState.not_found``); any other
refusal is ``UpstreamRejected`` and an unreachable EC2 ``UpstreamUnavailable``, each
logged here with AWS's error code or the failure's kind, never a credential.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import botocore.exceptions

from broker.aws.boto import aws_code, aws_session, client_config
from broker.aws.settings import AwsSettings
from broker.errors import UpstreamRejected, UpstreamUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

_ACCOUNT = re.compile(r"[0-9]{12}", re.ASCII)
THREADS = 2


@dataclass(frozen=True)
class InstanceState:
    """EC2's answer about one instance: ``name`` is its state (``None`` when the answer
    did not hold exactly one such instance with a state), or ``not_found`` when EC2 does
    not know the id in this account and region."""

    name: str | None
    not_found: bool = False


class Ec2Instances:
    """EC2 and STS clients on ``settings``'s credentials, endpoints and timeouts."""

    def __init__(self, settings: AwsSettings) -> None:
        self._settings = settings
        self._pool: ThreadPoolExecutor | None = None
        self._ec2: Any = None
        self._sts: Any = None
        self._account: str | None = None  # the broker's, once STS told it

    @property
    def started(self) -> bool:
        return self._pool is not None and self._ec2 is not None

    async def start(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="broker-ec2")
        self._ec2, self._sts = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._make
        )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._ec2 = self._sts = None

    async def own_account(self) -> str | None:
        """The broker's AWS account, learnt once; ``None`` while STS cannot tell (asked
        again next time)."""
        return await self._in_pool(self._own_account)

    async def state(self, instance: str) -> InstanceState:
        """The state of EC2 instance ``instance``. Raises ``UpstreamRejected`` when EC2
        refuses the call, ``UpstreamUnavailable`` when it cannot be reached."""
        return await self._in_pool(self._describe, instance)

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            raise UpstreamUnavailable("AWS EC2 (client not started)", code="aws_unavailable")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _make(self) -> tuple[Any, Any]:
        s = self._settings
        session = aws_session(s.credentials, s.region)
        config = client_config(connect_s=s.timeout_s, read_s=s.timeout_s, pool=THREADS)
        return (
            session.client("ec2", endpoint_url=s.ec2_endpoint, config=config),
            session.client("sts", endpoint_url=s.sts_endpoint, config=config),
        )

    def _own_account(self) -> str | None:
        if self._account is None:
            try:
                account = str(self._sts.get_caller_identity().get("Account", ""))
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                log.warning("sts get-caller-identity failed", extra={"error": type(exc).__name__})
                return None
            if _ACCOUNT.fullmatch(account):
                self._account = account
        return self._account

    def _describe(self, instance: str) -> InstanceState:
        try:
            reply = self._ec2.describe_instances(InstanceIds=[instance])
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "InvalidInstanceID.NotFound":
                return InstanceState(None, not_found=True)
            log.warning(
                "ec2 refused a liveness check",
                extra={"ec2_instance": instance, "aws_error": aws_code(code)},
            )
            raise UpstreamRejected("AWS EC2 refused the call", code="aws_ec2_rejected") from None
        except botocore.exceptions.BotoCoreError as exc:
            log.warning(
                "ec2 liveness check failed",
                extra={"ec2_instance": instance, "error": type(exc).__name__},
            )
            raise UpstreamUnavailable(
                "AWS EC2 is unavailable; retry shortly", code="aws_unavailable"
            ) from None
        states = [
            (i.get("State") or {}).get("Name")
            for r in reply.get("Reservations") or []
            for i in r.get("Instances") or []
            if i.get("InstanceId") == instance
        ]
        if len(states) != 1 or not isinstance(states[0], str):
            return InstanceState(None)
        return InstanceState(states[0])


__all__ = ["Ec2Instances", "InstanceState"]
