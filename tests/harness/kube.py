"""A loopback stand-in for the Kubernetes API server's pod endpoints, speaking the real
list-then-watch protocol to the broker's real client.

- LIST ``/api/v1/pods`` and ``/api/v1/namespaces/{ns}/pods``: the current snapshot
  (``set_pods``), or the next queued one (``queue_list``: each new list takes the next),
  filtered by namespace and an equality ``labelSelector``, paged with ``limit`` and
  ``continue``.
- WATCH (same paths, ``watch=1``): replays the event log (``emit``: recorded lines from
  ``tests/data/kubernetes``) after the requested ``resourceVersion``, line by line and each
  line in two writes, then streams new lines as they are emitted until ``timeoutSeconds``
  (capped by ``max_watch_s``) or ``end_watches()``. ``inject`` gives the next watch request
  one fault: an HTTP status (410), extra raw lines after the replay (an ERROR event,
  garbage), or a connection dropped in the middle of a line.
- GET ``/api/v1/namespaces/{ns}/pods/{name}`` for the liveness check.

Every request is recorded (path, query, bearer token), so a test can assert on the
positions the client asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

DATA = Path(__file__).resolve().parent.parent / "data" / "kubernetes"


# The uid of the pod the unit tests build.
UID = "3c1f6e0a-8a3e-4d7b-9a51-6f0e2b7c4d11"


def pod(uid: str | None = UID, rv: str | None = "41230", phase: str | None = "Running",
        deleting: bool = False) -> dict[str, Any]:
    """A Pod object as the API server sends it."""
    meta: dict[str, Any] = {"name": "api-6f7c9d8b5-x2kqp", "namespace": "payments"}
    if uid is not None:
        meta["uid"] = uid
    if rv is not None:
        meta["resourceVersion"] = rv
    if deleting:
        meta["deletionTimestamp"] = "2026-05-11T10:14:07Z"
    status = {"phase": phase} if phase is not None else {}
    return {"kind": "Pod", "apiVersion": "v1", "metadata": meta, "spec": {}, "status": status}


def load_pods() -> dict[str, dict[str, Any]]:
    """The recorded pods by name (``pods.json``)."""
    podlist = json.loads((DATA / "pods.json").read_text())
    return {p["metadata"]["name"]: p for p in podlist["items"]}


def load_stream(name: str) -> list[bytes]:
    """A recorded watch stream: its lines, as the API server sent them."""
    return [ln for ln in (DATA / name).read_bytes().split(b"\n") if ln.strip()]


def _rv_of(line: bytes) -> int | None:
    try:
        return int(json.loads(line)["object"]["metadata"]["resourceVersion"])
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class Injection:
    """One fault for the next watch request."""

    status: int | None = None  # answer the watch request with this HTTP status
    lines: list[bytes] = field(default_factory=list)  # sent after the replay, then close
    drop_after: int | None = None  # drop the connection mid-line after this many lines


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: dict[str, str]
    token: str | None


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
    return web.json_response(body, status=code)


class FakeKubeApi:
    def __init__(self, *, tokens: set[str] | None = None, max_watch_s: float = 30.0) -> None:
        self.tokens = tokens  # None: no authentication
        self.max_watch_s = max_watch_s
        self.requests: list[Seen] = []
        self.port = 0
        self._pods: list[dict[str, Any]] = []
        self._rv = "1"
        self._lists: deque[tuple[list[dict[str, Any]], str]] = deque()
        self._log: list[tuple[int | None, bytes]] = []
        self._injections: deque[Injection] = deque()
        self._changed = asyncio.Condition()
        self._generation = 0  # bumped by end_watches()
        self._runner: web.AppRunner | None = None

    # -- what the test controls ------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_pods(self, pods: list[dict[str, Any]], rv: str) -> None:
        self._pods, self._rv = copy.deepcopy(pods), rv

    def queue_list(self, pods: list[dict[str, Any]], rv: str) -> None:
        self._lists.append((copy.deepcopy(pods), rv))

    async def emit(self, lines: list[bytes]) -> None:
        async with self._changed:
            self._log.extend((_rv_of(ln), ln) for ln in lines)
            self._changed.notify_all()

    def inject(self, injection: Injection) -> None:
        self._injections.append(injection)

    async def end_watches(self) -> None:
        """End the open watches cleanly, as the server does at timeoutSeconds."""
        async with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def watch_queries(self) -> list[dict[str, str]]:
        return [r.query for r in self.requests if r.query.get("watch") == "1"]

    def list_queries(self) -> list[dict[str, str]]:
        return [r.query for r in self.requests
                if r.path.endswith("/pods") and r.query.get("watch") != "1"]

    def gets(self) -> list[Seen]:
        return [r for r in self.requests if not r.path.endswith("/pods")]

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/pods", self._pods_endpoint)
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods_endpoint)
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}", self._get_pod)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        await self.end_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers --------------------------------------------------------------------

    def _seen(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        self.requests.append(Seen(request.method, request.path, dict(request.query), token))
        if self.tokens is not None and token not in self.tokens:
            return _status(401, "Unauthorized", "Unauthorized")
        return None

    def _selected(self, namespace: str | None, selector: str | None) -> list[dict[str, Any]]:
        wanted = dict(kv.split("=", 1) for kv in selector.split(",")) if selector else {}
        return [p for p in self._pods
                if (namespace is None or p["metadata"]["namespace"] == namespace)
                and all(p["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())]

    async def _pods_endpoint(self, request: web.Request) -> web.StreamResponse:
        refused = self._seen(request)
        if refused is not None:
            return refused
        if request.query.get("watch") == "1":
            return await self._watch(request)
        cont = request.query.get("continue")
        if not cont and self._lists:
            self.set_pods(*self._lists.popleft())
        items = self._selected(request.match_info.get("ns"), request.query.get("labelSelector"))
        offset = int(cont) if cont else 0
        limit = int(request.query.get("limit", "0")) or len(items) or 1
        page = items[offset:offset + limit]
        meta: dict[str, Any] = {"resourceVersion": self._rv}
        if offset + limit < len(items):
            meta["continue"] = str(offset + limit)
        return web.json_response({"kind": "PodList", "apiVersion": "v1", "metadata": meta,
                                  "items": page})

    async def _get_pod(self, request: web.Request) -> web.Response:
        refused = self._seen(request)
        if refused is not None:
            return refused
        ns, name = request.match_info["ns"], request.match_info["name"]
        for p in self._pods:
            if (p["metadata"]["namespace"], p["metadata"]["name"]) == (ns, name):
                return web.json_response(p)
        return _status(404, "NotFound", f'pods "{name}" not found')

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        injection = self._injections.popleft() if self._injections else Injection()
        if injection.status is not None:
            return _status(injection.status, "Expired", "too old resource version")
        since = int(request.query.get("resourceVersion") or 0)
        timeout = min(float(request.query.get("timeoutSeconds", "30")), self.max_watch_s)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        generation = self._generation
        sent_upto = 0  # index into the log
        sent = 0
        try:
            while True:
                for rv, line in self._log[sent_upto:]:
                    sent_upto += 1
                    if rv is not None and rv <= since:
                        continue
                    if injection.drop_after is not None and sent == injection.drop_after:
                        await resp.write(line[: len(line) // 2])
                        await asyncio.sleep(0.05)
                        assert request.transport is not None
                        request.transport.abort()
                        return resp
                    half = len(line) // 2
                    await resp.write(line[:half])
                    await asyncio.sleep(0)
                    await resp.write(line[half:] + b"\n")
                    sent += 1
                if injection.lines:
                    for line in injection.lines:
                        await resp.write(line + b"\n")
                    break
                remaining = deadline - loop.time()
                if remaining <= 0 or generation != self._generation:
                    break
                async with self._changed:
                    if len(self._log) == sent_upto and generation == self._generation:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), remaining)
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client went away (it refused a line): nothing to finish
        return resp
