"""The ``aws_ec2`` liveness check: asks EC2 for the state of the instance a token names.

The instance id is the identity's instance id, or its last ``:``-separated part (for
issuers whose instance ids read like ``aws:123456789012:us-east-1:i-0abc…``); it must look
like an EC2 instance id, or the check answers ``None``. EC2 is asked in the account the
``aws`` section's credentials belong to and in its region: an instance id that names
another region or another account (a ``:``-separated part that is a region, or 12
digits) answers ``None``, since EC2 would say "not found" there, which is not "gone". The
broker's own account is learnt once from STS GetCallerIdentity, only for ids that name one.

Answers: ``False`` for ``InvalidInstanceID.NotFound`` and for ``shutting-down`` or
``terminated``; ``True`` for ``pending``, ``running``, ``stopping`` and ``stopped``;
``None`` for anything else (EC2 unreachable, throttled, refused, an answer of another
shape). Each answer is reused for ``cache_s`` per instance; a ``False`` for good (a
terminated instance never comes back). boto3 runs in a small thread pool, never on the
event loop, and concurrent checks of one instance share one call.
"""

from __future__ import annotations

import asyncio
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import botocore.config
import botocore.exceptions

from broker.aws.boto import aws_session, client_config
from broker.aws.settings import AwsSettings
from broker.clock import Clock
from broker.identity.model import Identity

log = logging.getLogger(__name__)

_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}", re.ASCII)
_REGION = re.compile(r"[a-z]{2,4}(-[a-z]+)+-[0-9]{1,2}", re.ASCII)
_ACCOUNT = re.compile(r"[0-9]{12}", re.ASCII)
_AWS_CODE = re.compile(r"[A-Za-z0-9_.]{1,64}", re.ASCII)
ALIVE_STATES = frozenset({"pending", "running", "stopping", "stopped"})
GONE_STATES = frozenset({"shutting-down", "terminated"})
# Instances remembered at most; past that, expired answers go first, then the oldest.
MAX_CACHED = 10_000
THREADS = 2


def ec2_instance_id(instance_id: str, region: str) -> str | None:
    """The EC2 instance id in a broker instance id, or ``None`` if there is none or it
    names a region other than ``region``."""
    parts = instance_id.split(":")
    if not _INSTANCE_ID.fullmatch(parts[-1]):
        return None
    if any(_REGION.fullmatch(p) and p != region for p in parts[:-1]):
        return None
    return parts[-1]


def account_named(instance_id: str) -> str | None:
    """The AWS account a broker instance id names before its EC2 id, if any; ``""`` if it
    names two different ones."""
    named = {p for p in instance_id.split(":")[:-1] if _ACCOUNT.fullmatch(p)}
    if len(named) > 1:
        return ""
    return next(iter(named), None)


def answer_for(state: str | None, *, not_found: bool = False) -> bool | None:
    if not_found:
        return False
    if state in GONE_STATES:
        return False
    if state in ALIVE_STATES:
        return True
    return None


class Ec2Liveness:
    def __init__(self, settings: AwsSettings, clock: Clock, cache_s: float) -> None:
        self._settings = settings
        self._clock = clock
        self._ttl = timedelta(seconds=cache_s)
        self._pool: ThreadPoolExecutor | None = None
        self._ec2: Any = None
        self._sts: Any = None
        self._account: str | None = None  # the broker's, once STS told it
        # broker instance id -> (answer, until; None: for good)
        self._cache: dict[str, tuple[bool | None, datetime | None]] = {}
        self._inflight: dict[str, asyncio.Future[bool | None]] = {}

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
        self._cache.clear()

    def _make(self) -> tuple[Any, Any]:
        s = self._settings
        session = aws_session(s.credentials, s.region)
        config = client_config(connect_s=s.timeout_s, read_s=s.timeout_s, pool=THREADS)
        return (
            session.client("ec2", endpoint_url=s.ec2_endpoint, config=config),
            session.client("sts", endpoint_url=s.sts_endpoint, config=config),
        )

    async def alive(self, identity: Identity) -> bool | None:
        key = identity.instance_id  # the answer depends on the account and region it names
        instance = ec2_instance_id(key, self._settings.region)
        if instance is None:
            return None
        now = self._clock.now()
        cached = self._cache.get(key)
        if cached is not None and (cached[1] is None or now < cached[1]):
            return cached[0]
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._ask(key, instance, account_named(key)))
            self._inflight[key] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(key, None))
        # A caller that gives up does not cancel the call others wait on.
        return await asyncio.shield(pending)

    async def _ask(self, key: str, instance: str, account: str | None) -> bool | None:
        if self._pool is None or self._ec2 is None:
            return None
        loop = asyncio.get_running_loop()
        try:
            # The SDK's own timeouts bound the thread; this bounds the wait for it.
            async with asyncio.timeout(self._settings.timeout_s * 3):
                if account is not None and account != await loop.run_in_executor(
                    self._pool, self._own_account
                ):
                    answer = None  # another account's instance (or ours is unknown yet)
                else:
                    # EC2 answers "not found" for another account's instance, for one
                    # launched a moment ago (eventual consistency) and for one terminated
                    # long ago: it proves the instance gone only where the id names this
                    # account. A plain id's "not found" is unknown; its "terminated" is not.
                    answer = await loop.run_in_executor(
                        self._pool, self._describe, instance, account is not None
                    )
        except TimeoutError:
            log.warning("ec2 liveness check timed out", extra={"ec2_instance": instance})
            answer = None
        except Exception as exc:  # noqa: BLE001 — could not tell is an answer
            log.warning(
                "ec2 liveness check failed",
                extra={"ec2_instance": instance, "error": type(exc).__name__},
            )
            answer = None
        self._remember(key, answer)
        return answer

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

    def _describe(self, instance: str, ours: bool) -> bool | None:
        try:
            reply = self._ec2.describe_instances(InstanceIds=[instance])
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "InvalidInstanceID.NotFound":
                return answer_for(None, not_found=True) if ours else None
            log.warning(
                "ec2 refused a liveness check",
                extra={
                    "ec2_instance": instance,
                    "aws_error": code if _AWS_CODE.fullmatch(code) else "unknown",
                },
            )
            return None
        states = [
            (i.get("State") or {}).get("Name")
            for r in reply.get("Reservations") or []
            for i in r.get("Instances") or []
            if i.get("InstanceId") == instance
        ]
        if len(states) != 1:
            return None
        return answer_for(states[0] if isinstance(states[0], str) else None)

    def _remember(self, key: str, answer: bool | None) -> None:
        now = self._clock.now()
        if len(self._cache) >= MAX_CACHED:
            for cached_key, (_, until) in list(self._cache.items()):
                if until is not None and until <= now:
                    del self._cache[cached_key]
            while len(self._cache) >= MAX_CACHED:
                del self._cache[next(iter(self._cache))]
        self._cache.pop(key, None)
        self._cache[key] = (answer, None if answer is False else now + self._ttl)


__all__ = ["Ec2Liveness", "ec2_instance_id"]
