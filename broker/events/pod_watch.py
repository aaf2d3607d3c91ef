"""The pod watch: terminate the instance of every pod that is deleted or has finished.

The protocol is the API server's list-then-watch:

1. LIST the pods (every namespace, or ``namespace``; ``label_selector``), page by page,
   as a consistent read of the current state. It yields the set of live pod uids and the
   list's ``resourceVersion``, the watch position.
2. WATCH from that position. Each line is one JSON event:
   ``ADDED``/``MODIFIED`` track the pod, or terminate it once its phase is ``Succeeded`` or
   ``Failed``; ``DELETED`` terminates it; ``BOOKMARK`` only moves the position; an
   ``ERROR`` with code 410 (or an HTTP 410) means the position is too old: LIST again.
3. The server ends a watch after ``timeoutSeconds``; the next one starts from the last
   acknowledged position.

Every (re)list compares: a pod that was live before and is no longer listed was deleted
while nobody watched; and with ``known`` (the store's active instances of the issuer), an
instance whose pod is not listed was deleted while the broker was down. Both are
terminated. ``known`` is read *before* the LIST: an instance the store knew then had its
pod created earlier still, so a consistent LIST shows that pod unless it is gone.

The position advances past an event only once ``terminate`` returned: when the store is
unavailable the watch backs off and resumes from the last acknowledged position (the API
server sends the event again), so no deletion is lost. A garbled or oversized line is a
broken stream: the watch LISTs again rather than guess what it missed.

The decisions (``decide`` for an event, ``plan_relist`` for a list) are pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from broker import kubernetes as k8s
from broker.backoff import retry_delay
from broker.errors import BrokerError, NotPermitted, UpstreamRejected, UpstreamUnavailable
from broker.events import Terminate
from broker.kubernetes.settings import KubernetesSettings

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 1024 * 1024
MAX_LIST_PAGES = 2000
# A session that ends sooner than this without an event did not make progress: the next
# one waits (backoff), so a server that closes every watch at once is not hammered.
MIN_HEALTHY_SESSION_S = 1.0
# Pods already terminated by this watch: a Job's pod finishes (MODIFIED, Succeeded) and
# is deleted later (DELETED); the second event needs no second store transaction.
REMEMBER_TERMINATED = 4096


class Verb(StrEnum):
    TRACK = "track"  # a live pod: remember its uid, advance the position
    TERMINATE = "terminate"  # a gone or finished pod: terminate, then advance
    BOOKMARK = "bookmark"  # advance the position only
    IGNORE = "ignore"  # nothing to do (advance if the event has a position)
    RELIST = "relist"  # the position is lost (410) or the stream is not to be trusted
    RETRY = "retry"  # the server reported an error: watch again from the same position


@dataclass(frozen=True)
class Action:
    verb: Verb
    uid: str | None = None
    resource_version: str | None = None
    reason: str = ""


def parse_event(line: bytes) -> dict[str, Any] | None:
    """One watch line as a JSON object, or None when it is not one."""
    try:
        event = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return event if isinstance(event, dict) else None


def _resource_version(obj: Mapping[str, Any]) -> str | None:
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
    return rv if isinstance(rv, str) and rv and len(rv) <= 64 else None


def decide(event: Any) -> Action:
    """What one watch event asks of the broker. Pure."""
    if not isinstance(event, Mapping):
        return Action(Verb.RELIST, reason="garbled")
    kind, obj = event.get("type"), event.get("object")
    if not isinstance(kind, str) or not isinstance(obj, Mapping):
        return Action(Verb.RELIST, reason="garbled")
    if kind == "ERROR":
        # The object is a Status. 410 Gone: the position fell out of the server's window.
        code = obj.get("code")
        if code == 410 or obj.get("reason") in ("Expired", "Gone"):
            return Action(Verb.RELIST, reason="gone")
        return Action(Verb.RETRY, reason=f"error {code}" if isinstance(code, int) else "error")
    rv = _resource_version(obj)
    if kind == "BOOKMARK":
        if rv is None:
            return Action(Verb.RELIST, reason="garbled")
        return Action(Verb.BOOKMARK, resource_version=rv)
    if kind not in ("ADDED", "MODIFIED", "DELETED"):
        return Action(Verb.IGNORE, resource_version=rv, reason=f"event type {kind}"[:80])
    uid = k8s.pod_uid(obj)
    if uid is None or rv is None:
        return Action(Verb.RELIST, reason="garbled")
    if kind == "DELETED":
        return Action(Verb.TERMINATE, uid=uid, resource_version=rv, reason="deleted")
    if k8s.pod_finished(obj):
        return Action(Verb.TERMINATE, uid=uid, resource_version=rv, reason="finished")
    return Action(Verb.TRACK, uid=uid, resource_version=rv)


@dataclass(frozen=True)
class RelistPlan:
    live: frozenset[str]  # the listed pods that still run
    terminate: tuple[str, ...]  # instances to terminate, in a stable order


def plan_relist(
    items: Iterable[Any], *, previous: set[str] | frozenset[str] | None,
    known: set[str] | frozenset[str] | None,
) -> RelistPlan:
    """Compare a fresh list with what was live before (``previous``) and with the store's
    active instances (``known``). A listed pod that has finished is not live: it is
    terminated when the broker knew it, like a pod that is no longer listed. A finished
    pod the broker never saw is left alone (no tombstone for every completed pod of the
    cluster). Raises ValueError for an item without a uid. Pure."""
    live: set[str] = set()
    for item in items:
        uid = k8s.pod_uid(item)
        if uid is None:
            raise ValueError("a listed pod has no valid metadata.uid")
        if not k8s.pod_finished(item):
            live.add(uid)
    gone = (set(previous or ()) | set(known or ())) - live
    return RelistPlan(frozenset(live), tuple(sorted(gone)))


class PodSource(Protocol):
    """What the watch needs of ``KubernetesClient``."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def list_pods(
        self, *, namespace: str | None, label_selector: str | None, limit: int,
        continue_token: str | None = None,
    ) -> dict[str, Any]: ...

    def watch_pods(
        self, *, namespace: str | None, label_selector: str | None, resource_version: str,
        timeout_s: int, max_line_bytes: int,
    ) -> AsyncGenerator[bytes, None]: ...


class _Stopped:
    pass


_STOPPED = _Stopped()


class PodWatch:
    """``run(stop)`` lists and watches until ``stop`` is set; ``run_once()`` is one session
    (a LIST when the position is unknown or lost, then one WATCH until the server ends it)
    and raises ``BrokerError`` when it failed. ``stats`` counts terminated, refused (the
    instance belongs to another issuer), relists, bookmarks and errors.

    ``known`` lists the store's active instances of ``settings.issuer``. It is used only
    when the watch sees every pod of the cluster (no namespace, no label selector): an
    instance whose pod is outside a narrower watch is not evidence that the pod is gone."""

    def __init__(
        self,
        settings: KubernetesSettings,
        client: PodSource,
        terminate: Terminate,
        known: Callable[[], Awaitable[set[str]]] | None,
        *,
        name: str = "kubernetes",
        watch_timeout_s: int = 300,
        page_size: int = 500,
        max_line_bytes: int = MAX_LINE_BYTES,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.name = name
        self.stats: Counter[str] = Counter()
        self._settings = settings
        self._client = client
        self._terminate = terminate
        scoped = settings.namespace is not None or bool(settings.label_selector)
        if known is not None and scoped:
            log.warning(
                "kubernetes watch is scoped: instances missing from its list are not "
                "terminated at relist (the liveness check covers them)",
                extra={"source": name, "namespace": settings.namespace},
            )
            known = None
        self._known = known
        self._actor = f"events:{name}"
        self._watch_timeout_s = watch_timeout_s
        self._page_size = page_size
        self._max_line_bytes = max_line_bytes
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        # The watch position and the live pods as of that position; None: LIST first.
        self._rv: str | None = None
        self._live: set[str] | None = None
        self._terminated: dict[str, None] = {}  # insertion-ordered, bounded

    @property
    def resource_version(self) -> str | None:
        """The last acknowledged position (None until the first LIST)."""
        return self._rv

    # -- the loop --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self._client.start()
        try:
            loop = asyncio.get_running_loop()
            failures = 0
            while not stop.is_set():
                started = loop.time()
                try:
                    outcome = await _until(self.run_once(), stop)
                except asyncio.CancelledError:
                    raise
                except BrokerError as exc:
                    self.stats["errors"] += 1
                    failures += 1
                    log.warning(
                        "kubernetes watch session failed",
                        extra={"source": self.name, "code": exc.code, "error": exc.message},
                    )
                except Exception:  # noqa: BLE001 — a source logs and carries on
                    self.stats["errors"] += 1
                    failures += 1
                    log.exception("kubernetes watch session failed", extra={"source": self.name})
                else:
                    if outcome is _STOPPED:
                        return
                    if outcome or loop.time() - started >= MIN_HEALTHY_SESSION_S:
                        failures = 0
                        continue
                    failures += 1
                delay = retry_delay(
                    failures, base=self._backoff_base_s, cap=self._backoff_max_s,
                    jitter=random.random(),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
        finally:
            await self._client.close()

    def counts(self) -> dict[str, int]:
        return dict(self.stats)

    async def close(self) -> None:
        """Nothing left open: ``run`` closes the client on its way out."""

    async def run_once(self) -> bool:
        """One session (the client must be started: ``run`` does it). True when it made
        progress: listed, handled an event, or learned that its position expired."""
        progressed = False
        if self._rv is None or self._live is None:
            await self._relist()
            progressed = True
        assert self._rv is not None
        lines = self._client.watch_pods(
            namespace=self._settings.namespace,
            label_selector=self._settings.label_selector,
            resource_version=self._rv,
            timeout_s=self._watch_timeout_s,
            max_line_bytes=self._max_line_bytes,
        )
        try:
            async for line in lines:
                action = decide(parse_event(line))
                if action.verb is Verb.RELIST:
                    self._lose_position(action.reason)
                    if action.reason == "gone":
                        return True  # routine: list again at once
                    raise UpstreamRejected(
                        "the watch sent a line that is not a watch event",
                        code=k8s.WATCH_GARBLED,
                    )
                if action.verb is Verb.RETRY:
                    raise UpstreamUnavailable(
                        f"the watch reported an {action.reason}", code=k8s.WATCH_ERROR
                    )
                await self._apply(action)
                progressed = True
        except UpstreamRejected as exc:
            if exc.code == k8s.RESOURCE_EXPIRED:  # HTTP 410 on the watch request
                self._lose_position("gone")
                return True
            if exc.code == k8s.WATCH_LINE_TOO_LONG:
                self._lose_position("line too long")
            raise
        finally:
            await lines.aclose()
        return progressed

    # -- steps -----------------------------------------------------------------------

    def _lose_position(self, reason: str) -> None:
        self.stats["relists"] += 1
        self._rv = None  # the live set stays: the next LIST compares against it
        log.info("kubernetes watch relists", extra={"source": self.name, "reason": reason})

    async def _apply(self, action: Action) -> None:
        if action.verb is Verb.TERMINATE:
            assert action.uid is not None
            await self._terminate_instance(action.uid, action.reason)
            if self._live is not None:
                self._live.discard(action.uid)
        elif action.verb is Verb.TRACK:
            assert action.uid is not None
            if self._live is not None:
                self._live.add(action.uid)
        elif action.verb is Verb.BOOKMARK:
            self.stats["bookmarks"] += 1
        if action.resource_version is not None:
            self._rv = action.resource_version  # acknowledged: terminate has returned

    async def _relist(self) -> None:
        known = await self._known() if self._known is not None else None
        items: list[Any] = []
        rv: str | None = None
        token: str | None = None
        for _ in range(MAX_LIST_PAGES):
            try:
                page = await self._client.list_pods(
                    namespace=self._settings.namespace,
                    label_selector=self._settings.label_selector,
                    limit=self._page_size,
                    continue_token=token,
                )
            except UpstreamRejected as exc:
                if exc.code != k8s.RESOURCE_EXPIRED:
                    raise
                # The continue token outlived the server's window: start the list over.
                raise UpstreamUnavailable(
                    "the pod list expired while it was paged", code=k8s.UNAVAILABLE
                ) from None
            meta = page.get("metadata")
            page_items = page.get("items")
            if not isinstance(meta, Mapping) or not isinstance(page_items, list | type(None)):
                raise UpstreamRejected("the pod list is not a PodList", code=k8s.REJECTED)
            items.extend(page_items or ())
            rv = rv or _resource_version(page)
            token = meta.get("continue") or None
            if not isinstance(token, str | None):
                raise UpstreamRejected("the pod list is not a PodList", code=k8s.REJECTED)
            if token is None:
                break
        else:
            raise UpstreamRejected("the pod list has too many pages", code=k8s.REJECTED)
        if rv is None:
            raise UpstreamRejected("the pod list has no resourceVersion", code=k8s.REJECTED)
        try:
            plan = plan_relist(items, previous=self._live, known=known)
        except ValueError as exc:
            raise UpstreamRejected(str(exc), code=k8s.REJECTED) from None
        for uid in plan.terminate:
            await self._terminate_instance(uid, "not listed")
            if self._live is not None:
                self._live.discard(uid)  # done: a failure further on does not redo it
        self._live = set(plan.live)
        self._rv = rv
        log.info(
            "kubernetes pods listed",
            extra={"source": self.name, "pods": len(plan.live), "terminated": len(plan.terminate)},
        )

    async def _terminate_instance(self, uid: str, reason: str) -> None:
        if uid in self._terminated:
            return
        try:
            await self._terminate(uid, actor=self._actor, issuer=self._settings.issuer)
        except NotPermitted as exc:
            self.stats["refused"] += 1
            log.warning(
                "kubernetes watch: instance not terminated",
                extra={"source": self.name, "instance_id": uid, "code": exc.code},
            )
            return
        self.stats["terminated"] += 1
        self._terminated[uid] = None
        if len(self._terminated) > REMEMBER_TERMINATED:
            del self._terminated[next(iter(self._terminated))]
        log.info(
            "pod gone: instance terminated",
            extra={"source": self.name, "instance_id": uid, "reason": reason},
        )


async def _until(work: Awaitable[Any], stop: asyncio.Event) -> Any:
    """``work``'s result, or ``_STOPPED`` as soon as ``stop`` is set (``work`` cancelled)."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if task.cancelled():
        return _STOPPED
    return task.result()
