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
terminated instance never comes back). Concurrent checks of one instance share one call;
the calls themselves are ``broker.aws.ec2``'s.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import datetime, timedelta

from broker.aws.ec2 import Ec2Instances
from broker.aws.settings import AwsSettings
from broker.clock import Clock
from broker.errors import BrokerError
from broker.identity.model import Identity

log = logging.getLogger(__name__)

_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}", re.ASCII)
_REGION = re.compile(r"[a-z]{2,4}(-[a-z]+)+-[0-9]{1,2}", re.ASCII)
_ACCOUNT = re.compile(r"[0-9]{12}", re.ASCII)
ALIVE_STATES = frozenset({"pending", "running", "stopping", "stopped"})
GONE_STATES = frozenset({"shutting-down", "terminated"})
# Instances remembered at most; past that, expired answers go first, then the oldest.
MAX_CACHED = 10_000


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
    """``instances`` stands in for the EC2 client built from ``settings`` (for tests)."""

    def __init__(
        self,
        settings: AwsSettings,
        clock: Clock,
        cache_s: float,
        *,
        instances: Ec2Instances | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._ttl = timedelta(seconds=cache_s)
        self._instances = instances if instances is not None else Ec2Instances(settings)
        # broker instance id -> (answer, until; None: for good)
        self._cache: dict[str, tuple[bool | None, datetime | None]] = {}
        self._inflight: dict[str, asyncio.Future[bool | None]] = {}

    async def start(self) -> None:
        await self._instances.start()

    async def close(self) -> None:
        await self._instances.close()
        self._cache.clear()

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
        if not self._instances.started:
            return None
        try:
            # The SDK's own timeouts bound the thread; this bounds the wait for it.
            async with asyncio.timeout(self._settings.timeout_s * 3):
                if account is not None and account != await self._instances.own_account():
                    answer = None  # another account's instance (or ours is unknown yet)
                else:
                    state = await self._instances.state(instance)
                    # EC2 answers "not found" for another account's instance, for one
                    # launched a moment ago (eventual consistency) and for one terminated
                    # long ago: it proves the instance gone only where the id names this
                    # account. A plain id's "not found" is unknown; its "terminated" is not.
                    if state.not_found:
                        answer = answer_for(None, not_found=True) if account is not None else None
                    else:
                        answer = answer_for(state.name)
        except TimeoutError:
            log.warning("ec2 liveness check timed out", extra={"ec2_instance": instance})
            answer = None
        except BrokerError:
            answer = None  # EC2 refused or was unreachable; broker.aws.ec2 logged which
        except Exception as exc:  # noqa: BLE001 — could not tell is an answer
            log.warning(
                "ec2 liveness check failed",
                extra={"ec2_instance": instance, "error": type(exc).__name__},
            )
            answer = None
        self._remember(key, answer)
        return answer

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
