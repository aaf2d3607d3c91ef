"""The broker's workload API as the agent calls it, with the pod's projected token read
from its file for every call (the kubelet replaces the file before the token expires).

Every call answers with a value: ``Answer(status, body)`` for an HTTP answer, or
``Answer(None, ...)`` when there was none (refused connection, timeout, TLS failure, an
unreadable token file). The token is never logged, and a body is handed back only to the
caller that asked for the credential in it.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from broker.secret import Secret

MAX_TOKEN_BYTES = 64 * 1024
TIMEOUT_S = 15.0
TERMINATE_REASON = "agent exit (on-exit terminate)"


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no HTTP answer
    body: dict[str, Any] = field(default_factory=dict, repr=False)
    problem: str = ""  # why there was no answer (no value in it)

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def code(self) -> str | None:
        """The broker's error code, e.g. ``role_not_permitted``."""
        error = self.body.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        return code if isinstance(code, str) else None

    @property
    def message(self) -> str:
        error = self.body.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        return message[:300] if isinstance(message, str) else self.problem


def read_token(path: Path) -> Secret:
    with path.open("rb") as f:
        raw = f.read(MAX_TOKEN_BYTES + 1)
    if len(raw) > MAX_TOKEN_BYTES:
        raise ValueError("the token file is too large")
    token = raw.decode("utf-8").strip()
    if not token:
        raise ValueError("the token file is empty")
    return Secret(token)


def _tls_failure(exc: aiohttp.ClientSSLError) -> Answer:
    """No answer because the TLS handshake failed: a code for ``/ready`` and the log, and
    a sentence saying what to check."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        verify = getattr(exc.certificate_error, "verify_message", None) or "verification failed"
        problem = (
            f"the broker's TLS certificate is not trusted ({verify}): "
            "is --ca-pem or --ca-file the CA that signed it?"
        )
        return Answer(None, {"error": {"code": "broker_certificate_untrusted"}}, problem=problem)
    os_error = getattr(exc, "os_error", None)
    reason = str(getattr(os_error, "reason", None) or type(os_error or exc).__name__)
    problem = f"the TLS handshake with the broker failed ({reason.lower().replace('_', ' ')})"
    return Answer(None, {"error": {"code": "broker_tls_failed"}}, problem=problem)


class BrokerClient:
    """``tls``: how the broker's certificate is verified (``AgentConfig.broker_tls``)."""

    def __init__(
        self,
        url: str,
        token_file: Path,
        tls: ssl.SSLContext | bool = True,
        timeout: float = TIMEOUT_S,
    ) -> None:
        self._url = url.rstrip("/")
        self._token_file = token_file
        self._ssl = tls
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> BrokerClient:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def issue(self, role: str, ttl: int | None, params: dict[str, str]) -> Answer:
        body: dict[str, Any] = {"role": role, **params}
        if ttl is not None:
            body["ttl"] = f"{ttl}s"
        return await self._call("POST", "/v1/credentials", body)

    async def renew(self, lease_id: str) -> Answer:
        return await self._call("POST", f"/v1/leases/{lease_id}/renew", {})

    async def release(self, lease_id: str) -> Answer:
        return await self._call("DELETE", f"/v1/leases/{lease_id}", None)

    async def terminate(self, reason: str = TERMINATE_REASON) -> Answer:
        return await self._call("POST", "/v1/instances/self/terminate", {"reason": reason})

    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Answer:
        assert self._session is not None, "use the client as an async context manager"
        try:
            token = read_token(self._token_file)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            return Answer(None, problem=f"cannot read the token file: {why}")
        headers = {"Authorization": f"Bearer {token.reveal()}"}
        try:
            async with self._session.request(
                method, self._url + path, json=body, headers=headers, ssl=self._ssl
            ) as resp:
                raw = await resp.read()
                return Answer(resp.status, _object(raw))
        except aiohttp.ClientSSLError as exc:
            return _tls_failure(exc)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return Answer(None, problem=f"no answer from the broker ({type(exc).__name__})")


def _object(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}
