"""The broker's own calls to AWS: STS (unsigned, aiohttp) and IAM (signed, boto3).

boto3 is synchronous: its calls run in a bounded thread pool, never on the event loop.
They happen only on termination (the deny policy), not on the issuance path; the STS
exchange on the issuance path is one unsigned form POST, made with aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import unquote

import aiohttp
import botocore.config
import botocore.exceptions

from broker.aws import SessionRef, StsSession, WebIdentityRequest, iam_policy
from broker.aws.boto import aws_session, client_config
from broker.aws.settings import AwsSettings
from broker.aws.sts import MAX_ANSWER_BYTES, parse_error, parse_session, web_identity_form
from broker.clock import Clock
from broker.errors import BrokerError, UpstreamRejected, UpstreamUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
# A deny reaches this far past the broker's clock: sessions of a terminated instance can
# no longer be issued (tombstone), so denying a few minutes ahead costs nothing and covers
# skew between the broker's clock and AWS's, which stamps aws:TokenIssueTime.
CLOCK_SKEW = timedelta(minutes=5)
# IAM errors a later attempt may cure; any other is the configuration's fault.
_IAM_RETRYABLE = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ServiceFailure",
        "ServiceUnavailable",
        "RequestLimitExceeded",
        "ConcurrentModification",
        "InternalFailure",
    }
)


def _unavailable(what: str, *, outcome_unknown: bool = False) -> UpstreamUnavailable:
    return UpstreamUnavailable(
        f"{what} is unavailable; retry shortly",
        code="aws_unavailable",
        outcome_unknown=outcome_unknown,
    )


class AwsClient:
    def __init__(self, settings: AwsSettings, clock: Clock) -> None:
        self._settings = settings
        self._clock = clock
        self._http: aiohttp.ClientSession | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._iam: Any = None
        self._role_locks: dict[str, asyncio.Lock] = {}

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout_s),
            raise_for_status=False,
        )
        workers = self._settings.iam_concurrency
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="broker-iam")
        self._iam = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._make_iam, workers
        )

    def _make_iam(self, workers: int) -> Any:
        timeout = self._settings.timeout_s
        return aws_session(self._settings.credentials, self._settings.region).client(
            "iam",
            endpoint_url=self._settings.iam_endpoint,
            config=client_config(connect_s=timeout, read_s=timeout, pool=workers),
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._iam = None

    # -- STS -------------------------------------------------------------------------

    async def assume_role_with_web_identity(self, request: WebIdentityRequest) -> StsSession:
        if self._http is None:
            raise _unavailable("AWS STS (client not started)")
        try:
            async with self._http.post(
                f"{self._settings.sts_url}/",
                data=web_identity_form(request),
                headers={"Accept": "application/xml"},
                allow_redirects=False,
            ) as resp:
                status = resp.status
                body = await _read_bounded(resp, MAX_ANSWER_BYTES + 1)
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("aws sts call failed", extra={"error": type(exc).__name__})
            # A refused connection sent nothing; anything later may have reached STS.
            raise _unavailable(
                "AWS STS", outcome_unknown=not isinstance(exc, aiohttp.ClientConnectorError)
            ) from None
        if status == 200:
            try:
                session = parse_session(body)
                if not session.assumed_role_id.endswith(f":{request.session_name}"):
                    raise UpstreamRejected(
                        "AWS STS answered for another session name", code="aws_sts_bad_response"
                    )
            except UpstreamRejected as exc:  # STS may have issued a session all the same
                raise type(exc)(exc.message, code=exc.code, outcome_unknown=True) from None
            return session
        error = parse_error(body)
        log.warning("aws sts refused a call", extra={"status": status, "aws_error": error.code})
        if status >= 500 or error.retryable:
            raise _unavailable("AWS STS")
        raise UpstreamRejected(
            f"AWS STS refused the web identity exchange ({error.code}); check the IAM OIDC "
            "provider, the role's trust policy and the role's session policy",
            code="aws_sts_rejected",
        )

    # -- IAM -------------------------------------------------------------------------

    async def deny_sessions(self, ref: SessionRef, *, issued_before: datetime) -> None:
        """Make sure the role's deny policy refuses ``ref``'s sessions issued before
        ``issued_before`` (plus ``CLOCK_SKEW``); returns once IAM shows it in place.

        Read-modify-write of one policy per role: calls for one role are serialized here;
        across replicas the caller holds a lock for the role (see the revocation worker).
        """
        lock = self._role_locks.setdefault(ref.role_arn, asyncio.Lock())
        async with lock:
            await self._in_thread(self._deny_sync, ref, issued_before + CLOCK_SKEW)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None or self._iam is None:
            raise _unavailable("AWS IAM (client not started)")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except BrokerError:
            raise
        except botocore.exceptions.ClientError as exc:
            raise _iam_error(exc) from None
        except (
            botocore.exceptions.NoCredentialsError,
            botocore.exceptions.PartialCredentialsError,
            botocore.exceptions.CredentialRetrievalError,
        ) as exc:
            log.warning("aws iam call failed", extra={"error": type(exc).__name__})
            raise UpstreamRejected(
                "the broker has no usable AWS credentials; check the aws section",
                code="aws_no_credentials",
            ) from None
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            log.warning("aws iam call failed", extra={"error": type(exc).__name__})
            raise _unavailable("AWS IAM") from None

    def _deny_sync(self, ref: SessionRef, before: datetime) -> None:
        iam, name = self._iam, self._settings.revoked_sessions_policy
        try:
            role = iam.get_role(RoleName=ref.role_name)["Role"]
        except botocore.exceptions.ClientError as exc:
            if _code(exc) == "NoSuchEntity":
                # A deleted role's sessions have no permissions left to deny.
                log.info("iam role is gone; nothing to deny", extra={"role_arn": ref.role_arn})
                return
            raise
        if role.get("Arn") != ref.role_arn:
            raise UpstreamRejected(
                "the IAM role's ARN differs from the one the session was issued for",
                code="aws_role_mismatch",
            )
        userid = f"{role['RoleId']}:{ref.session_name}"
        current = self._read_policy(ref.role_name, name)
        if iam_policy.denies(current, userid, before):
            return
        try:
            updated = iam_policy.with_denied(current, userid, before, self._clock.now())
        except iam_policy.PolicyTooLarge as exc:
            raise UpstreamRejected(
                f"{exc} ({ref.role_arn}); add a role or shorten the broker's roles' sessions",
                code="aws_deny_policy_full",
            ) from None
        iam.put_role_policy(
            RoleName=ref.role_name, PolicyName=name, PolicyDocument=iam_policy.encode(updated)
        )
        if not iam_policy.denies(self._read_policy(ref.role_name, name), userid, before):
            raise UpstreamRejected(
                "IAM does not show the deny policy in place yet; retrying",
                code="aws_deny_unconfirmed",
            )
        log.info(
            "sts sessions denied",
            extra={"role_arn": ref.role_arn, "session_name": ref.session_name},
        )

    def _read_policy(self, role_name: str, policy_name: str) -> dict[str, Any] | None:
        try:
            doc = self._iam.get_role_policy(RoleName=role_name, PolicyName=policy_name)[
                "PolicyDocument"
            ]
        except botocore.exceptions.ClientError as exc:
            if _code(exc) == "NoSuchEntity":
                return None
            raise
        if isinstance(doc, str):  # the raw API URL-encodes it; boto3 usually decodes
            try:
                doc = json.loads(unquote(doc))
            except ValueError:
                raise UpstreamRejected(
                    "the role's deny policy is not JSON", code="aws_bad_response"
                ) from None
        return doc if isinstance(doc, dict) else None


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or its first ``limit`` bytes: an answer that long is refused anyway."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(16 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "unknown"))[:64]


def _iam_error(exc: botocore.exceptions.ClientError) -> BrokerError:
    code = _code(exc)
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    log.warning("aws iam refused a call", extra={"status": status, "aws_error": code})
    if status >= 500 or code in _IAM_RETRYABLE:
        return _unavailable("AWS IAM")
    if code in ("AccessDenied", "AccessDeniedException"):
        return UpstreamRejected(
            "AWS IAM refused the broker (AccessDenied); it needs iam:GetRole, "
            "iam:GetRolePolicy and iam:PutRolePolicy on the role",
            code="aws_permission_denied",
        )
    if code == "LimitExceeded":
        return UpstreamRejected(
            "the role's inline policies are at IAM's size limit", code="aws_deny_policy_full"
        )
    return UpstreamRejected(f"AWS IAM refused the call ({code})", code="aws_iam_rejected")
