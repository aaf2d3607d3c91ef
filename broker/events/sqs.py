"""EC2 instance terminations heard from an SQS queue that an EventBridge rule feeds.

An EventBridge rule sends "EC2 Instance State-change Notification" events to a queue
(raw event JSON, no SNS envelope); ``SqsTerminationSource`` long-polls it and calls
``Terminate`` for each instance that reached one of ``settings.states``.

What a message is, decided by ``parse_state_change`` (pure, no I/O):

- **malformed**: not UTF-8 text of at most ``MAX_BODY_BYTES``, not a JSON object, a
  duplicate key anywhere, not ``source == "aws.ec2"`` with ``detail-type`` exactly
  ``"EC2 Instance State-change Notification"``, or a field out of shape: ``detail`` not an
  object, ``detail.instance-id`` not ``i-`` and 8 to 17 lower-case hex digits,
  ``detail.state`` not one of EC2's six states, ``account`` not 12 digits, ``region`` not
  an AWS region. The parser raises ``ValueError`` with a fixed text that never echoes the
  message.
- **ignored**: a well-formed notification whose state is not one the source acts on
  (``running``, ``stopped``, …); the parser returns ``None``.
- otherwise a ``StateChange``.

When a message is deleted (acknowledged): only after ``Terminate`` returned (the
revocation job is durable), or when it is malformed or ignored (nothing will ever come of
it), or refused because another issuer owns the instance. On ``StoreUnavailable`` or any
other failure it stays in the queue and SQS delivers it again after the visibility
timeout; a queue's redrive policy moves one that keeps failing to a dead-letter queue.
Terminations are idempotent, so a message delivered twice creates one job.

The queue is the trust boundary: its access policy admits only the EventBridge rule (see
``deploy/events-sqs.md``). Log lines name the SQS message id, the event id, the instance
and the outcome, never a body, a receipt handle or a credential.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import random
import re
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeVar

from broker.aws.sqs import SqsQueue
from broker.errors import BrokerError, ConfigError, NotPermitted, UpstreamUnavailable
from broker.events import Terminate
from broker.events.settings import SqsEventSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

SOURCE = "aws.ec2"
DETAIL_TYPE = "EC2 Instance State-change Notification"
# SQS's classic message size limit; an EventBridge event is at most 256 KB.
MAX_BODY_BYTES = 256 * 1024
EC2_STATES = frozenset({"pending", "running", "stopping", "stopped", "shutting-down", "terminated"})
TERMINATION_STATES: tuple[str, ...] = ("shutting-down", "terminated")
ACTOR = "events:sqs"
OUTCOMES = ("terminated", "ignored", "malformed", "refused", "failed")

INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}", re.ASCII)
_ACCOUNT = re.compile(r"[0-9]{12}", re.ASCII)
_REGION = re.compile(r"[a-z]{2,4}(-[a-z]+)+-[0-9]{1,2}", re.ASCII)
_EVENT_ID = re.compile(r"[0-9a-fA-F-]{1,64}", re.ASCII)
_MESSAGE_ID = re.compile(r"[A-Za-z0-9-]{1,100}", re.ASCII)

# A terminate call that takes longer than this counts as failed; the message comes back.
TERMINATE_TIMEOUT_S = 30.0
# An empty poll is repeated no sooner than this (short polling, wait_time_s 0, would spin).
MIN_POLL_INTERVAL_S = 1.0


@dataclass(frozen=True)
class StateChange:
    instance_id: str  # EC2's, e.g. i-0123456789abcdef0
    state: str
    account: str
    region: str
    event_id: str | None = None  # EventBridge's id when it is id-shaped; for log lines

    def broker_instance_id(self, template: str) -> str:
        """The broker's instance id, from ``events.sqs.instance_id_format`` (plain
        ``{instance_id}``, ``{account}`` and ``{region}`` fields, checked by the config)."""
        return template.format(
            instance_id=self.instance_id, account=self.account, region=self.region
        )


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers that keep different duplicates see two different instances.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey
        out[key] = value
    return out


def _no_constant(_: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


def _text(obj: dict[str, Any], key: str, pattern: re.Pattern[str], what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(what)
    return value


def parse_state_change(
    body: str, states: Collection[str] = TERMINATION_STATES
) -> StateChange | None:
    """The state change an SQS message body carries; ``None`` if it is a well-formed
    notification for a state not in ``states`` (ignored); ``ValueError`` if it is
    malformed (see the module docstring). The error text never contains the body."""
    if not isinstance(body, str):
        raise ValueError("the message body is not text")
    if len(body) > MAX_BODY_BYTES or len(body.encode("utf-8", "surrogatepass")) > MAX_BODY_BYTES:
        raise ValueError("the message body is larger than 256 KiB")
    try:
        event = json.loads(body, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except _DuplicateKey:
        raise ValueError("the message has a duplicate key") from None
    except (ValueError, RecursionError):
        raise ValueError("the message body is not JSON") from None
    if not isinstance(event, dict):
        raise ValueError("the message is not a JSON object")
    if event.get("source") != SOURCE:
        raise ValueError("the event's source is not aws.ec2")
    if event.get("detail-type") != DETAIL_TYPE:
        raise ValueError("the event is not an EC2 instance state-change notification")
    detail = event.get("detail")
    if not isinstance(detail, dict):
        raise ValueError("the event's detail is not an object")
    instance_id = _text(detail, "instance-id", INSTANCE_ID, "detail.instance-id is malformed")
    state = detail.get("state")
    if not isinstance(state, str) or state not in EC2_STATES:
        raise ValueError("detail.state is not an EC2 instance state")
    account = _text(event, "account", _ACCOUNT, "account is not an AWS account id")
    region = _text(event, "region", _REGION, "region is not an AWS region")
    if state not in states:
        return None
    event_id = event.get("id")
    return StateChange(
        instance_id=instance_id,
        state=state,
        account=account,
        region=region,
        event_id=event_id if isinstance(event_id, str) and _EVENT_ID.fullmatch(event_id) else None,
    )


def poll_backoff(failures: int, *, base_s: float, max_s: float, rand: float) -> float:
    """Seconds to wait after ``failures`` failed polls in a row: exponential, capped,
    with jitter (``rand`` in [0, 1) keeps it between half and all of the step)."""
    step: float = min(max_s, base_s * 2 ** min(max(failures - 1, 0), 30))
    return step * (0.5 + rand / 2)


class SqsTerminationSource:
    """Long-polls one SQS queue for EC2 state-change events and terminates instances.

    ``stats`` counts messages by outcome (``OUTCOMES``); ``errors`` counts failed SQS
    calls by operation (``receive``, ``delete``). A message delivered again is counted
    again. ``queue`` stands in for the SQS client built from ``settings`` (for tests)."""

    def __init__(
        self,
        settings: SqsEventSettings,
        terminate: Terminate,
        *,
        name: str = "sqs",
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 30.0,
        queue: SqsQueue | None = None,
    ) -> None:
        unknown = set(settings.states) - EC2_STATES
        if unknown or not settings.states:
            raise ConfigError(
                f"events.sqs.states: expected EC2 instance states among {sorted(EC2_STATES)}"
            )
        self.name = name
        self._settings = settings
        self._terminate = terminate
        self._backoff = (backoff_base_s, backoff_max_s)
        if queue is None:
            queue = SqsQueue(
                settings.queue_url,
                region=settings.region,
                credentials=settings.credentials,
                endpoint=settings.endpoint,
                longest_wait_s=settings.wait_time_s,
                name=name,
            )
        self._queue = queue
        self.stats: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()

    # -- the loop ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set. A failing poll (or a message that could not be
        handled) is logged and followed by a capped, jittered pause; nothing ends the loop
        but ``stop``. A long poll in flight when ``stop`` is set is abandoned: the messages
        it may still receive become visible again after the visibility timeout."""
        failures = 0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            started = loop.time()
            try:
                handled, failed = await self._poll(stop)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — a source logs and carries on
                handled, failed = 0, True
                if isinstance(exc, BrokerError):
                    log.warning(
                        "sqs poll failed",
                        extra={"source": self.name, "error": exc.code, "detail": exc.message},
                    )
                else:
                    log.exception("sqs poll failed", extra={"source": self.name})
            if failed:
                failures += 1
                base, cap = self._backoff
                pause = poll_backoff(failures, base_s=base, max_s=cap, rand=random.random())
            else:
                failures = 0
                elapsed = loop.time() - started
                pause = MIN_POLL_INTERVAL_S - elapsed if handled == 0 else 0.0
            if pause > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)

    async def run_once(self) -> int:
        """One ReceiveMessage (long polling for ``wait_time_s``) and the handling of what
        it brought: how many messages were handled, whatever their outcome. Raises
        ``UpstreamUnavailable``/``UpstreamRejected`` if the receive itself failed."""
        handled, _ = await self._poll(None)
        return handled

    def counts(self) -> dict[str, int]:
        return dict(self.stats)

    async def close(self) -> None:
        await self._queue.close()

    # -- one poll ----------------------------------------------------------------------

    async def _poll(self, stop: asyncio.Event | None) -> tuple[int, bool]:
        """(messages handled, whether any failed). With ``stop``, the receive is raced
        against it and ``(0, False)`` comes back as soon as it is set."""
        s = self._settings
        receive = asyncio.ensure_future(
            self._call(
                "receive",
                self._queue.receive,
                s.max_messages,
                s.wait_time_s,
                s.visibility_timeout_s,
            )
        )
        if stop is not None:
            stopped = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({receive, stopped}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                receive.cancel()
                raise
            finally:
                stopped.cancel()
            if not receive.done():
                receive.cancel()  # the thread finishes its long poll; its answer is dropped
                return 0, False
        messages = await receive
        deletable: list[tuple[str, str]] = []  # (message id, receipt handle)
        failed = False
        for message in messages:
            outcome = await self._handle(message)
            self.stats[outcome] += 1
            failed = failed or outcome == "failed"
            handle = message.get("ReceiptHandle")
            if outcome != "failed" and isinstance(handle, str) and handle:
                deletable.append((_message_id(message), handle))
        if deletable:
            await self._delete(deletable)
        return len(messages), failed

    async def _handle(self, message: dict[str, Any]) -> str:
        message_id = _message_id(message)
        where: dict[str, Any] = {"source": self.name, "message_id": message_id}
        body = message.get("Body")
        try:
            if not isinstance(body, str):
                raise ValueError("the message body is not text")
            change = parse_state_change(body, self._settings.states)
        except ValueError as exc:
            # str(exc) is one of the parser's fixed texts; the body is never logged.
            log.warning("sqs message malformed; deleted", extra={**where, "reason": str(exc)})
            return "malformed"
        if change is None:
            log.debug("sqs message ignored: state not watched", extra=where)
            return "ignored"
        instance_id = change.broker_instance_id(self._settings.instance_id_format)
        where.update(event_id=change.event_id, instance_id=instance_id, state=change.state)
        try:
            async with asyncio.timeout(TERMINATE_TIMEOUT_S):
                job = await self._terminate(instance_id, actor=ACTOR, issuer=self._settings.issuer)
        except NotPermitted as exc:
            if exc.code != "instance_issuer_mismatch":
                return self._failed(where, message, exc.code)
            log.warning(
                "sqs termination refused: another issuer owns the instance; deleted",
                extra={**where, "issuer": self._settings.issuer},
            )
            return "refused"
        except BrokerError as exc:
            return self._failed(where, message, exc.code)
        except TimeoutError:
            return self._failed(where, message, "timeout")
        except Exception:  # noqa: BLE001 — one message's failure must not stop the rest
            log.exception(
                "sqs termination failed; message kept for redelivery",
                extra={**where, "receive_count": _receive_count(message)},
            )
            return "failed"
        log.info(
            "instance terminated by an ec2 state-change event",
            extra={**where, "job_id": job.job_id, "job_state": job.state},
        )
        return "terminated"

    def _failed(self, where: dict[str, Any], message: dict[str, Any], error: str) -> str:
        log.warning(
            "sqs termination failed; message kept for redelivery",
            extra={**where, "error": error, "receive_count": _receive_count(message)},
        )
        return "failed"

    async def _delete(self, entries: list[tuple[str, str]]) -> None:
        try:
            failed = await self._call("delete", self._queue.delete, [h for _, h in entries])
        except BrokerError as exc:
            # Handled messages come back after the visibility timeout and are handled
            # again, idempotently.
            log.warning(
                "sqs delete failed; messages will be delivered again",
                extra={"source": self.name, "error": exc.code, "count": len(entries)},
            )
            return
        for index, code in failed:
            self.errors["delete"] += 1
            log.warning(
                "sqs delete of a message failed; it will be delivered again",
                extra={"source": self.name, "message_id": entries[index][0], "aws_error": code},
            )

    async def _call(self, what: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._queue.closed:
            raise UpstreamUnavailable("the SQS source is closed", code="aws_unavailable")
        try:
            return await fn(*args)
        except BrokerError:
            self.errors[what] += 1
            raise


def _message_id(message: dict[str, Any]) -> str:
    value = message.get("MessageId")
    return value if isinstance(value, str) and _MESSAGE_ID.fullmatch(value) else "?"


def _receive_count(message: dict[str, Any]) -> int | None:
    value = (message.get("Attributes") or {}).get("ApproximateReceiveCount")
    return int(value) if isinstance(value, str) and value.isdigit() and len(value) < 10 else None


__all__ = [
    "ACTOR",
    "MAX_BODY_BYTES",
    "OUTCOMES",
    "SqsTerminationSource",
    "StateChange",
    "parse_state_change",
]
