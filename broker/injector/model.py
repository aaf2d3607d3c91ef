"""What the injector decides and what it asks the broker, as plain values.

``mutate`` answers ``Patch | Refusal | Skip``; the policy preview answers
``PreviewAnswer | PreviewUnavailable``. The server turns them into an AdmissionResponse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The annotations' (and the inject label's) prefix, version 1 of the contract.
PREFIX = "ephemeral-broker/"
STATUS_KEY = PREFIX + "status"
INJECT_KEY = PREFIX + "inject"

JsonPatchOp = dict[str, Any]


@dataclass(frozen=True)
class Patch:
    """RFC 6902 operations for the pod (never empty), and warnings for whoever created it.
    ``first_pass`` is False for a reinvocation's completion of an injected pod."""

    ops: tuple[JsonPatchOp, ...]
    warnings: tuple[str, ...] = ()
    first_pass: bool = True


@dataclass(frozen=True)
class Refusal:
    """The pod is not admitted. ``message`` names the annotation (or the part of the pod)
    and what is expected; ``code`` is the HTTP-style status Kubernetes shows (400: the pod
    asks for something invalid; 403: the broker's policy refuses one of its roles)."""

    message: str
    code: int = 400


@dataclass(frozen=True)
class Skip:
    """The pod is admitted unchanged. ``reason`` is a stable word for logs and metrics:
    not_opted_in, namespace_skipped, already_injected, not_a_pod_create."""

    reason: str


@dataclass(frozen=True)
class PreviewQuery:
    """What the injector asks ``POST /v1/admin/policy/preview``: the claims a projected
    token of this pod would carry, and every role its annotations request."""

    issuer: str
    claims: dict[str, Any]
    roles: tuple[str, ...]

    @property
    def workload(self) -> str:
        """``namespace/serviceaccount``: whom the verdicts are about, as a pod's creator
        would name it."""
        k8s = self.claims["kubernetes.io"]
        return f"{k8s['namespace']}/{k8s['serviceaccount']['name']}"

    def body(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "claims": self.claims, "roles": list(self.roles)}


@dataclass(frozen=True)
class RoleVerdict:
    """The broker's verdict on one role: granted or not, and its stable code. Not its
    reason: that sentence names rules and says whether a role exists, which is the policy
    team's to read (``brokerctl policy explain``), not whoever may create a pod."""

    role: str
    granted: bool
    code: str | None


@dataclass(frozen=True)
class PreviewAnswer:
    workload: str  # namespace/serviceaccount
    verdicts: tuple[RoleVerdict, ...]


@dataclass(frozen=True)
class PreviewUnavailable:
    """The broker could not say (unreachable, timed out, refused the injector's own call).
    Never a reason to refuse a pod: only a warning."""

    reason: str


Preview = PreviewAnswer | PreviewUnavailable
