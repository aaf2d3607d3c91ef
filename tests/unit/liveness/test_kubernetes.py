"""The ``kubernetes`` liveness check's pure half: which pod a token names, and whether the
pod the API server returned is that instance, still running."""

from __future__ import annotations

from typing import Any

import pytest

from broker.liveness.kubernetes import pod_alive, pod_ref
from tests.harness.kube import UID, pod


def claims(ns: Any = "payments", name: Any = "api-6f7c9d8b5-x2kqp") -> dict[str, Any]:
    return {"kubernetes.io": {"namespace": ns, "pod": {"name": name, "uid": UID},
                              "serviceaccount": {"name": "payments-api", "uid": "x"}}}


REFS = [
    ("valid", claims(), ("payments", "api-6f7c9d8b5-x2kqp")),
    ("dotted-name", claims(name="web.v2-0"), ("payments", "web.v2-0")),
    ("no-kubernetes-claim", {"sub": "system:serviceaccount:payments:api"}, None),
    ("claim-not-a-mapping", {"kubernetes.io": "payments"}, None),
    ("no-pod", {"kubernetes.io": {"namespace": "payments"}}, None),
    ("pod-not-a-mapping", {"kubernetes.io": {"namespace": "payments", "pod": "x"}}, None),
    ("namespace-missing", claims(ns=None), None),
    ("namespace-upper-case", claims(ns="Payments"), None),
    ("namespace-with-slash", claims(ns="payments/../kube-system"), None),
    ("namespace-too-long", claims(ns="a" * 64), None),
    ("name-with-slash", claims(name="api/../../secrets"), None),
    ("name-encoded", claims(name="api%2F..%2Fx"), None),
    ("name-too-long", claims(name="a" * 254), None),
    ("name-not-a-string", claims(name=42), None),
    ("name-trailing-dash", claims(name="api-"), None),
]


@pytest.mark.parametrize(("given", "expected"), [(c, e) for _, c, e in REFS],
                         ids=[i for i, _, _ in REFS])
def test_pod_ref(given: dict[str, Any], expected: Any) -> None:
    assert pod_ref(given) == expected


ALIVE = [
    ("running", pod(), True),
    ("pending", pod(phase="Pending"), True),
    ("in-grace-period", pod(deleting=True), True),
    ("not-found", None, False),
    ("recreated-other-uid", pod(uid="8e2d4b17-2c6f-4f0a-b3d9-71a5c0e9f822"), False),
    ("succeeded", pod(phase="Succeeded"), False),
    ("failed", pod(phase="Failed"), False),
    ("failed-in-grace-period", pod(phase="Failed", deleting=True), False),
]


@pytest.mark.parametrize(("found", "expected"), [(p, e) for _, p, e in ALIVE],
                         ids=[i for i, _, _ in ALIVE])
def test_pod_alive(found: Any, expected: bool) -> None:
    assert pod_alive(found, UID) is expected


def test_pod_alive_refuses_to_say_false_for_a_pod_without_uid() -> None:
    with pytest.raises(ValueError):
        pod_alive(pod(uid=None), UID)
