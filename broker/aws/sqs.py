"""One SQS queue, as the termination source reads it: receive a batch, delete a batch.

boto3 runs in the queue's one thread, never on the event loop. Every botocore failure is
translated here into ``UpstreamUnavailable`` (worth retrying: throttling, AWS's own
failures, the network) or ``UpstreamRejected`` (the configuration's fault: permissions,
a missing queue, no credentials), with the same codes whatever the operation. Log lines
name the operation and AWS's error code, never a receipt handle (AWS's error messages
may quote one, so they are dropped) or a credential.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import botocore.exceptions

from broker.aws.boto import aws_code, aws_session, client_config
from broker.aws.settings import AwsDefaultChain, AwsStaticKeys
from broker.errors import BrokerError, UpstreamRejected, UpstreamUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

_SQS_RETRYABLE = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "ServiceUnavailable",
        "InternalFailure",
        "InternalError",
        "KmsThrottled",
        "KMS.ThrottlingException",
    }
)


def _sqs_error(code: str, status: int) -> BrokerError:
    if status >= 500 or code in _SQS_RETRYABLE:
        return UpstreamUnavailable("AWS SQS is unavailable; retry shortly", code="aws_unavailable")
    if code in ("AccessDenied", "AccessDeniedException") or code.startswith("KMS."):
        return UpstreamRejected(
            f"AWS SQS refused the broker ({code}); it needs sqs:ReceiveMessage and "
            "sqs:DeleteMessage on the queue (and kms:Decrypt if the queue is encrypted "
            "with a customer key)",
            code="aws_permission_denied",
        )
    if code in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
        return UpstreamRejected(
            "the SQS queue does not exist; check events.sqs.queue_url and region",
            code="sqs_queue_missing",
        )
    return UpstreamRejected(f"AWS SQS refused the call ({code})", code="sqs_rejected")


class SqsQueue:
    """The queue at ``queue_url``. ``longest_wait_s`` bounds the long polls it will be
    asked for (the read timeout allows for it); ``name`` is the source's, for log lines
    and the thread's name."""

    def __init__(
        self,
        queue_url: str,
        *,
        region: str,
        credentials: AwsDefaultChain | AwsStaticKeys,
        endpoint: str | None,
        longest_wait_s: int,
        name: str,
    ) -> None:
        self._queue_url = queue_url
        self._region = region
        self._credentials = credentials
        self._endpoint = endpoint
        self._longest_wait_s = longest_wait_s
        self._name = name
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"broker-{name}"
        )
        self._sqs: Any = None

    @property
    def closed(self) -> bool:
        return self._pool is None

    async def receive(
        self, max_messages: int, wait_s: int, visibility_timeout_s: int
    ) -> list[dict[str, Any]]:
        """At most ``max_messages`` messages, long polling for ``wait_s``: SQS's message
        objects as it sent them (``MessageId``, ``ReceiptHandle``, ``Body``,
        ``Attributes.ApproximateReceiveCount``), unchecked; the caller trusts none of
        their fields. Cancelling the wait leaves the poll to finish in the thread."""
        return await self._call(
            "receive", self._receive_sync, max_messages, wait_s, visibility_timeout_s
        )

    async def delete(self, receipts: list[str]) -> list[tuple[int, str]]:
        """Delete in one batch; the (index into ``receipts``, AWS error code) of each
        entry that failed."""
        return await self._call("delete", self._delete_sync, receipts)

    async def close(self) -> None:
        if self._pool is not None:
            # A long poll in flight finishes on its own (at most wait_s).
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._sqs = None

    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            raise UpstreamUnavailable("the SQS source is closed", code="aws_unavailable")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except botocore.exceptions.ClientError as exc:
            code = aws_code(exc.response.get("Error", {}).get("Code", ""))
            log.warning(
                "aws sqs refused a call",
                extra={"source": self._name, "operation": what, "aws_error": code},
            )
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            raise _sqs_error(code, status) from None
        except (
            botocore.exceptions.NoCredentialsError,
            botocore.exceptions.PartialCredentialsError,
            botocore.exceptions.CredentialRetrievalError,
        ):
            raise UpstreamRejected(
                "the broker has no usable AWS credentials for SQS; check events.sqs.credentials",
                code="aws_no_credentials",
            ) from None
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            log.warning(
                "aws sqs call failed",
                extra={"source": self._name, "operation": what, "error": type(exc).__name__},
            )
            raise UpstreamUnavailable(
                "AWS SQS is unavailable; retry shortly", code="aws_unavailable"
            ) from None

    def _client(self) -> Any:
        if self._sqs is None:
            self._sqs = aws_session(self._credentials, self._region).client(
                "sqs",
                endpoint_url=self._endpoint,
                # A long poll holds the response for up to wait_s.
                config=client_config(connect_s=10, read_s=self._longest_wait_s + 10, pool=1),
            )
        return self._sqs

    def _receive_sync(
        self, max_messages: int, wait_s: int, visibility_timeout_s: int
    ) -> list[dict[str, Any]]:
        answer = self._client().receive_message(
            QueueUrl=self._queue_url,
            MaxNumberOfMessages=max_messages,
            WaitTimeSeconds=wait_s,
            VisibilityTimeout=visibility_timeout_s,
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
        )
        messages = answer.get("Messages") or []
        if not isinstance(messages, list):
            return []
        return [m for m in messages[:max_messages] if isinstance(m, dict)]

    def _delete_sync(self, receipts: list[str]) -> list[tuple[int, str]]:
        # AWS's message for a failed entry quotes the receipt handle: it is dropped here.
        answer = self._client().delete_message_batch(
            QueueUrl=self._queue_url,
            Entries=[{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(receipts)],
        )
        failed: list[tuple[int, str]] = []
        for entry in answer.get("Failed") or []:
            try:
                index = int(entry.get("Id", ""))
            except ValueError:
                continue
            if 0 <= index < len(receipts):
                failed.append((index, aws_code(entry.get("Code", ""))))
        return failed


__all__ = ["SqsQueue"]
