"""The broker's calls to the Kubernetes API server: get one pod, list pods, watch pods.

Authentication is the service account's bearer token, read from ``token_file``. Projected
tokens rotate (the kubelet swaps the file, by default well before the hour is up), so the
file is looked at again on every request and re-read when it changed, at least every
``token_recheck_s``, and after a 401. The token lives in a ``Secret``: it is never logged.

TLS is verified against ``ca_file`` (the in-cluster CA); plain http is accepted by its
settings (``broker.kubernetes.settings``) only towards a loopback address (``kubectl
proxy``, tests).

aiohttp errors and unusable answers become ``UpstreamUnavailable`` (retry: unreachable,
timing out, 429, 5xx) or ``UpstreamRejected`` (401, 403, 410, other refusals, garbled
answers) here, with ``kubernetes_*`` codes from ``broker.kubernetes``; nothing above this
module sees aiohttp.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import AsyncGenerator
from typing import Any
from urllib.parse import quote

import aiohttp

from broker import kubernetes as k8s
from broker.errors import ConfigError, UpstreamRejected, UpstreamUnavailable
from broker.kubernetes.settings import KubernetesSettings
from broker.secret import Secret

log = logging.getLogger(__name__)

# One pod or one page of a list; a page of 500 pods is a few MB.
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024
MAX_TOKEN_BYTES = 64 * 1024


def _unavailable(message: str, code: str = k8s.UNAVAILABLE) -> UpstreamUnavailable:
    return UpstreamUnavailable(message, code=code)


def _rejected(message: str, code: str = k8s.REJECTED) -> UpstreamRejected:
    return UpstreamRejected(message, code=code)


class KubernetesClient:
    """Shared by the pod watch and the liveness checks: each user calls ``start`` and
    ``close``; the HTTP session lives while anyone uses it."""

    def __init__(self, settings: KubernetesSettings, *, token_recheck_s: float = 60.0) -> None:
        self._settings = settings
        self._token_recheck_s = token_recheck_s
        self._session: aiohttp.ClientSession | None = None
        self._users = 0
        self._token: Secret | None = None
        self._token_stat: tuple[int, int, int] | None = None
        self._token_read_at = 0.0

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._users += 1
        if self._session is not None:
            return
        ssl_ctx: ssl.SSLContext | bool = False
        if self._settings.api_url.startswith("https://"):
            ssl_ctx = True
            if self._settings.ca_file is not None:
                try:
                    ssl_ctx = ssl.create_default_context(cafile=str(self._settings.ca_file))
                except (OSError, ssl.SSLError) as exc:
                    self._users -= 1
                    raise ConfigError(
                        f"kubernetes.ca_file: cannot load {self._settings.ca_file}: "
                        f"{getattr(exc, 'strerror', None) or exc}"
                    ) from None
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=32, ssl=ssl_ctx),
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout_s),
            raise_for_status=False,
        )

    async def close(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users == 0 and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # -- the calls -------------------------------------------------------------------

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The pod, or None if it does not exist (404)."""
        if not k8s.valid_namespace(namespace) or not k8s.valid_pod_name(name):
            raise _rejected("not a valid namespace or pod name", code="kubernetes_bad_name")
        path = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"
        status, body = await self._get(path, None)
        if status == 404:
            return None
        return self._object(status, body, path)

    async def list_pods(
        self,
        *,
        namespace: str | None,
        label_selector: str | None,
        limit: int,
        continue_token: str | None = None,
    ) -> dict[str, Any]:
        """One page of a pod list (``items``, ``metadata.resourceVersion``,
        ``metadata.continue``). Without a resourceVersion, the list is a consistent read
        of the current state, never a possibly stale cache."""
        params = {"limit": str(limit)}
        if label_selector:
            params["labelSelector"] = label_selector
        if continue_token:
            params["continue"] = continue_token
        path = self._pods_path(namespace)
        status, body = await self._get(path, params)
        return self._object(status, body, path)

    async def watch_pods(
        self,
        *,
        namespace: str | None,
        label_selector: str | None,
        resource_version: str,
        timeout_s: int,
        max_line_bytes: int,
    ) -> AsyncGenerator[bytes, None]:
        """The raw lines of one watch (one JSON event each), from ``resource_version``
        until the server ends it (after about ``timeout_s``). A line longer than
        ``max_line_bytes`` raises ``UpstreamRejected`` (``kubernetes_watch_line_too_long``);
        a connection that drops, even mid-line, raises ``UpstreamUnavailable``."""
        session = self._require_session()
        path = self._pods_path(namespace)
        params = {
            "watch": "1",
            "allowWatchBookmarks": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_s),
        }
        if label_selector:
            params["labelSelector"] = label_selector
        slack = self._settings.timeout_s
        # The server ends the watch after timeoutSeconds; the client's own deadline, a
        # little later, bounds a server that does not.
        timeout = aiohttp.ClientTimeout(
            total=timeout_s + 2 * slack, sock_connect=slack, sock_read=timeout_s + slack
        )
        try:
            async with session.get(
                self._url(path), params=params, headers=self._headers(), timeout=timeout
            ) as resp:
                if resp.status != 200:
                    body = await _read_bounded(resp, MAX_ERROR_BYTES)
                    raise self._status_error(resp.status, body, path)
                buf = bytearray()
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    while (end := buf.find(b"\n")) >= 0:
                        if end > max_line_bytes:
                            break
                        line = bytes(buf[:end])
                        del buf[: end + 1]
                        if line.strip():
                            yield line
                    if len(buf) > max_line_bytes:
                        raise _rejected(
                            f"a watch event is longer than {max_line_bytes} bytes",
                            code=k8s.WATCH_LINE_TOO_LONG,
                        )
                if buf.strip():
                    raise _unavailable("the watch ended in the middle of an event")
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.info(
                "kubernetes watch ended", extra={"path": path, "error": type(exc).__name__}
            )
            raise _unavailable("the Kubernetes API server is unreachable") from None

    # -- transport -------------------------------------------------------------------

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise _unavailable("the Kubernetes client is not started")
        return self._session

    def _url(self, path: str) -> str:
        return self._settings.api_url + path

    @staticmethod
    def _pods_path(namespace: str | None) -> str:
        if namespace is None:
            return "/api/v1/pods"
        if not k8s.valid_namespace(namespace):
            raise _rejected("not a valid namespace name", code="kubernetes_bad_name")
        return f"/api/v1/namespaces/{quote(namespace, safe='')}/pods"

    async def _get(self, path: str, params: dict[str, str] | None) -> tuple[int, bytes]:
        session = self._require_session()
        try:
            async with session.get(
                self._url(path), params=params, headers=self._headers()
            ) as resp:
                limit = MAX_BODY_BYTES if resp.status == 200 else MAX_ERROR_BYTES
                return resp.status, await _read_bounded(resp, limit)
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning(
                "kubernetes call failed", extra={"path": path, "error": type(exc).__name__}
            )
            raise _unavailable("the Kubernetes API server is unreachable") from None

    def _object(self, status: int, body: bytes, path: str) -> dict[str, Any]:
        if status != 200:
            raise self._status_error(status, body, path)
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise _rejected("the Kubernetes API server sent an answer that is not an object")
        return obj

    def _status_error(self, status: int, body: bytes, path: str) -> Exception:
        log.warning("kubernetes refused a call", extra={"path": path, "status": status})
        if status == 401:
            self._token_stat = None  # re-read the token before the next call
            return _rejected(
                "the Kubernetes API server refused the broker's service account token",
                code=k8s.UNAUTHORIZED,
            )
        if status == 403:
            return _rejected(
                "the Kubernetes API server refused the call (permission denied); "
                "check the broker's RBAC: get, list and watch on pods",
                code=k8s.FORBIDDEN,
            )
        if status == 410:
            return _rejected(
                "the watch position is too old (410 Gone)", code=k8s.RESOURCE_EXPIRED
            )
        if status == 429 or status >= 500:
            return _unavailable(f"the Kubernetes API server answered {status}; retry shortly")
        return _rejected(f"the Kubernetes API server answered {status}")

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self._bearer()
        if token is not None:
            headers["Authorization"] = f"Bearer {token.reveal()}"
        return headers

    def _bearer(self) -> Secret | None:
        path = self._settings.token_file
        if path is None:
            return None
        try:
            st = path.stat()
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            stale = time.monotonic() - self._token_read_at >= self._token_recheck_s
            if self._token is None or key != self._token_stat or stale:
                with path.open("rb") as f:
                    raw = f.read(MAX_TOKEN_BYTES + 1)
                value = raw.decode("ascii").strip()
                if not value or len(raw) > MAX_TOKEN_BYTES or any(c.isspace() for c in value):
                    raise ValueError("not a token")
                self._token = Secret(value)
                self._token_stat = key
                self._token_read_at = time.monotonic()
        except (OSError, ValueError):
            log.warning("cannot read the kubernetes token file", extra={"path": str(path)})
            raise _unavailable(
                f"cannot read the service account token file {path}", code=k8s.TOKEN_UNREADABLE
            ) from None
        return self._token


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        buf += chunk
        if len(buf) > limit:
            raise _rejected(f"the Kubernetes API server's answer is larger than {limit} bytes")
    return bytes(buf)
