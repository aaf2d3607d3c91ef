"""The Kubernetes provider: one small API-server client (``client``) and what a pod object
says. Its users live with their capability: the pod watch that terminates the instance of
a pod that is deleted or has finished (``broker.events.pod_watch``) and the ``kubernetes``
liveness check (``broker.liveness.kubernetes``).

For a ``kubernetes`` issuer the instance id is the pod uid (claim
``kubernetes.io.pod.uid``). A uid is never reused: once a pod with that uid is gone, the
instance is gone for good.

This module holds the pure pieces both parts share: what a pod object says about its
life, and which names may become path segments of an API-server URL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# No container of a pod in one of these phases runs any more, nor ever will again.
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})

# Error codes at this package's boundary (on UpstreamUnavailable / UpstreamRejected).
UNAVAILABLE = "kubernetes_unavailable"  # unreachable, timing out, 429/5xx: retry
REJECTED = "kubernetes_rejected"  # an answer the broker cannot use
UNAUTHORIZED = "kubernetes_unauthorized"  # 401: the service account token was refused
FORBIDDEN = "kubernetes_forbidden"  # 403: RBAC does not allow the call
RESOURCE_EXPIRED = "kubernetes_resource_expired"  # 410 Gone: the watch position is lost
TOKEN_UNREADABLE = "kubernetes_token_unreadable"
WATCH_GARBLED = "kubernetes_watch_garbled"  # an event line that is not a watch event
WATCH_LINE_TOO_LONG = "kubernetes_watch_line_too_long"
WATCH_ERROR = "kubernetes_watch_error"  # an ERROR event other than 410

# RFC 1123 label (namespaces, at most 63) and subdomain (pod names, at most 253), as the
# API server validates them (its subdomain check does not bound each part).
_DNS1123_LABEL = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?\Z")
_PART = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = re.compile(rf"^{_PART}(?:\.{_PART})*\Z")
# Pod uids are UUIDs; accept any short token-like string, nothing that could be a path.
_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z")


def valid_namespace(value: object) -> bool:
    return isinstance(value, str) and bool(_DNS1123_LABEL.match(value))


def valid_pod_name(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 253 and bool(_DNS1123_SUBDOMAIN.match(value))


def valid_uid(value: object) -> bool:
    return isinstance(value, str) and bool(_UID.match(value))


def pod_uid(pod: Any) -> str | None:
    """The pod's ``metadata.uid`` if it is a well-formed uid, else None."""
    meta = pod.get("metadata") if isinstance(pod, Mapping) else None
    uid = meta.get("uid") if isinstance(meta, Mapping) else None
    return uid if valid_uid(uid) else None


def pod_phase(pod: Any) -> str | None:
    status = pod.get("status") if isinstance(pod, Mapping) else None
    phase = status.get("phase") if isinstance(status, Mapping) else None
    return phase if isinstance(phase, str) else None


def pod_finished(pod: Any) -> bool:
    """True once no container of the pod runs any more (phase Succeeded or Failed).

    A pod with a ``deletionTimestamp`` is *not* finished: its containers run through their
    termination grace period (draining connections, flushing work, often with the very
    credentials the broker issued). It is gone when the API server deletes the object."""
    return pod_phase(pod) in TERMINAL_PHASES


__all__ = [
    "TERMINAL_PHASES",
    "pod_finished",
    "pod_phase",
    "pod_uid",
    "valid_namespace",
    "valid_pod_name",
    "valid_uid",
]
