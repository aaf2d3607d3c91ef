"""The ``kubernetes`` liveness check: does the pod a token names still exist, with the
token's uid, and still run?

The namespace and pod name come from the verified claims (``kubernetes.io.namespace``,
``kubernetes.io.pod.name``); the API server is asked for that pod
(``GET /api/v1/namespaces/{ns}/pods/{name}``, which needs ``get`` on pods).

- 404, or a pod with another uid (deleted and re-created under the same name): ``False``.
- phase ``Succeeded`` or ``Failed``: ``False`` (no container runs any more).
- a ``deletionTimestamp``: ``True``. The pod is shutting down but its containers still
  run through their grace period and may need their credentials until the end; it is
  gone, and answered ``False``, once the API server deletes it (the pod watch terminates
  the instance at that moment).
- claims missing or malformed, the API server unreachable or refusing: ``None``.

Answers are reused per instance for ``cache_s``; ``False`` is final (a pod uid never comes
back) and kept as long as the cache has room. Concurrent questions about one instance
share one request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Protocol

from broker import kubernetes as k8s
from broker.clock import Clock, SystemClock
from broker.errors import BrokerError
from broker.identity.model import Identity

log = logging.getLogger(__name__)

MAX_CACHED = 50_000
MAX_CONCURRENT_REQUESTS = 16


class PodGetter(Protocol):
    """What the check needs of ``KubernetesClient``."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None: ...


def pod_ref(claims: Mapping[str, Any]) -> tuple[str, str] | None:
    """(namespace, pod name) from a Kubernetes service-account token's claims, or None when
    they are missing or are not valid Kubernetes names. Pure."""
    k = claims.get("kubernetes.io")
    if not isinstance(k, Mapping):
        return None
    namespace = k.get("namespace")
    pod = k.get("pod")
    name = pod.get("name") if isinstance(pod, Mapping) else None
    if not k8s.valid_namespace(namespace) or not k8s.valid_pod_name(name):
        return None
    return str(namespace), str(name)


def pod_alive(pod: Mapping[str, Any] | None, instance_id: str) -> bool:
    """The answer for the pod the API server returned (None: 404) for this instance. Raises
    ValueError for an object without a uid: only a clear answer may say ``False``. Pure."""
    if pod is None:
        return False
    uid = k8s.pod_uid(pod)
    if uid is None:
        raise ValueError("the pod has no valid metadata.uid")
    if uid != instance_id:
        return False
    return not k8s.pod_finished(pod)


class KubernetesLiveness:
    def __init__(
        self, client: PodGetter, cache_s: float, *, clock: Clock | None = None
    ) -> None:
        self._client = client
        self._ttl = timedelta(seconds=cache_s)
        self._clock = clock or SystemClock()
        # instance id -> (answer, valid until; None: for good)
        self._cache: dict[str, tuple[bool, datetime | None]] = {}
        self._inflight: dict[str, asyncio.Task[bool | None]] = {}
        self._limit = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)

    async def start(self) -> None:
        await self._client.start()

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        self._inflight.clear()
        await self._client.close()

    async def alive(self, identity: Identity) -> bool | None:
        key = identity.instance_id
        now = self._clock.now()
        cached = self._cache.get(key)
        if cached is not None:
            answer, until = cached
            if until is None or now < until:
                return answer
            del self._cache[key]
        ref = pod_ref(identity.claims)
        if ref is None:
            return None
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._ask(key, *ref))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._forget, key))
        return await asyncio.shield(task)

    def _forget(self, key: str, _task: asyncio.Task[bool | None]) -> None:
        self._inflight.pop(key, None)

    async def _ask(self, instance_id: str, namespace: str, name: str) -> bool | None:
        try:
            async with self._limit:
                pod = await self._client.get_pod(namespace, name)
            answer = pod_alive(pod, instance_id)
        except BrokerError as exc:
            code = exc.code
        except ValueError:  # the pod object does not read as a pod
            code = "bad_pod"
        else:
            self._remember(instance_id, answer)
            return answer
        log.warning("kubernetes liveness unknown", extra={"instance_id": instance_id, "code": code})
        return None

    def _remember(self, instance_id: str, answer: bool) -> None:
        until = None if answer is False else self._clock.now() + self._ttl
        self._cache.pop(instance_id, None)
        self._cache[instance_id] = (answer, until)
        while len(self._cache) > MAX_CACHED:
            del self._cache[next(iter(self._cache))]
