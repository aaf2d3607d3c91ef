"""AdmissionReview (``admission.k8s.io/v1``) in and out. Pure.

``decode`` refuses a body that is not a review (the HTTP handler answers 400); everything
about the pod itself is ``mutate``'s to judge, and every review that decodes gets an
AdmissionResponse that echoes its ``uid``.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any

from broker.injector.model import Patch, Preview, Refusal, Skip
from broker.injector.mutate import mutate
from broker.injector.settings import InjectorSettings

API_VERSION = "admission.k8s.io/v1"
MAX_UID = 256
# The API server truncates longer warnings, and drops them past 4096 characters in all.
MAX_WARNING = 256
MAX_WARNINGS_TOTAL = 4000
MAX_MESSAGE = 8000
# A namespace is a DNS-1123 label; "" is what a cluster-scoped request carries.
NAMESPACE = re.compile(r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)?\Z")
_REASONS = {400: "BadRequest", 403: "Forbidden", 500: "InternalError"}

Outcome = Patch | Refusal | Skip


class MalformedReview(ValueError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Review:
    uid: str
    namespace: str
    operation: str
    kind: dict[str, Any]
    resource: dict[str, Any]
    sub_resource: str
    object: Any

    @property
    def pod_create(self) -> bool:
        """A CREATE of a Pod itself (not a subresource such as ``pods/ephemeralcontainers``
        or ``pods/binding``), which is all the injector changes."""
        return (
            self.operation == "CREATE"
            and self.kind.get("group", "") == ""
            and self.kind.get("kind") == "Pod"
            and self.resource.get("resource") == "pods"
            and not self.sub_resource
        )


def decode(raw: bytes) -> Review:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise MalformedReview("the body is not JSON") from None
    except RecursionError:
        # No pod nests anywhere near Python's recursion limit (about 1000 levels).
        raise MalformedReview("the body nests too deeply to be a review") from None
    if not isinstance(body, dict):
        raise MalformedReview("expected an AdmissionReview object")
    if body.get("apiVersion") != API_VERSION or body.get("kind") != "AdmissionReview":
        raise MalformedReview(f"expected kind AdmissionReview, apiVersion {API_VERSION}")
    request = body.get("request")
    if not isinstance(request, dict):
        raise MalformedReview("request: expected an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid or len(uid) > MAX_UID:
        raise MalformedReview("request.uid: expected a non-empty string")
    fields: dict[str, Any] = {}
    for key, kind, default in (
        ("namespace", str, ""),
        ("operation", str, ""),
        ("kind", dict, {}),
        ("resource", dict, {}),
        ("subResource", str, ""),
    ):
        value = request.get(key, default)
        if value is None:
            value = default
        if not isinstance(value, kind):
            raise MalformedReview(f"request.{key}: expected a {kind.__name__}")
        fields[key] = value
    if not NAMESPACE.match(fields["namespace"]):
        # It becomes a metrics label and a log field: only what Kubernetes would name.
        raise MalformedReview("request.namespace: expected a namespace name (a DNS-1123 label)")
    return Review(
        uid=uid,
        namespace=fields["namespace"],
        operation=fields["operation"],
        kind=fields["kind"],
        resource=fields["resource"],
        sub_resource=fields["subResource"],
        object=request.get("object"),
    )


def admit(
    review: Review,
    config: InjectorSettings,
    preview: Preview | None = None,
    *,
    ca_pem: str | None = None,
) -> Outcome:
    if not review.pod_create:
        return Skip("not_a_pod_create")
    return mutate(review.object, review.namespace, config, preview, ca_pem=ca_pem)


def _warnings(warnings: tuple[str, ...]) -> list[str]:
    out, total = [], 0
    for w in warnings:
        text = w if len(w) <= MAX_WARNING else w[: MAX_WARNING - 3] + "..."
        total += len(text)
        if total > MAX_WARNINGS_TOTAL:
            break
        out.append(text)
    return out


def answer(uid: str, outcome: Outcome) -> dict[str, Any]:
    """The AdmissionReview to send back for ``outcome``."""
    response: dict[str, Any] = {"uid": uid, "allowed": not isinstance(outcome, Refusal)}
    if isinstance(outcome, Patch):
        patch = json.dumps(list(outcome.ops), separators=(",", ":")).encode()
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(patch).decode()
        if outcome.warnings:
            response["warnings"] = _warnings(outcome.warnings)
    elif isinstance(outcome, Refusal):
        message = outcome.message
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        response["status"] = {
            "status": "Failure",
            "code": outcome.code,
            "reason": _REASONS.get(outcome.code, "BadRequest"),
            "message": message,
        }
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}
