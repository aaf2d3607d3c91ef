"""AdmissionReview in and out: what is not a review is refused (the handler answers 400),
what is not a pod CREATE is admitted unchanged, the uid is always echoed, and for any JSON
at all the pure path from bytes to answer never raises."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.injector.model import Patch, Refusal, Skip
from broker.injector.review import MalformedReview, Review, admit, answer, decode
from tests.unit.injector.podkit import CONFIG, container, pod, review

GOOD = review(pod({"containers": [container("app")]}))
NOT_A_NAMESPACE = "request.namespace: expected a namespace name (a DNS-1123 label)"


def raw(value: Any) -> bytes:
    return json.dumps(value).encode()


@pytest.mark.parametrize(("body", "message"), [
    (b"", "the body is not JSON"),
    (b"{", "the body is not JSON"),
    (b"\xff", "the body is not JSON"),
    (raw([]), "expected an AdmissionReview object"),
    (raw({**GOOD, "apiVersion": "admission.k8s.io/v1beta1"}),
     "expected kind AdmissionReview, apiVersion admission.k8s.io/v1"),
    (raw({**GOOD, "kind": "Pod"}), "expected kind AdmissionReview, apiVersion admission.k8s.io/v1"),
    (raw({k: v for k, v in GOOD.items() if k != "request"}), "request: expected an object"),
    (raw({**GOOD, "request": {**GOOD["request"], "uid": ""}}),
     "request.uid: expected a non-empty string"),
    (raw({**GOOD, "request": {**GOOD["request"], "uid": 7}}),
     "request.uid: expected a non-empty string"),
    (raw({**GOOD, "request": {**GOOD["request"], "uid": "u" * 257}}),
     "request.uid: expected a non-empty string"),
    (raw({**GOOD, "request": {**GOOD["request"], "namespace": ["a"]}}),
     "request.namespace: expected a str"),
    (raw({**GOOD, "request": {**GOOD["request"], "kind": "Pod"}}), "request.kind: expected a dict"),
    (b"[" * 100_000 + b"]" * 100_000, "the body nests too deeply to be a review"),
    (raw(GOOD).replace(b'"object": {', b'"object": {"deep": ' + b"[" * 5000 + b"]" * 5000
                       + b", ", 1), "the body nests too deeply to be a review"),
    (raw({**GOOD, "request": {**GOOD["request"], "namespace": "a" * 64}}), NOT_A_NAMESPACE),
    (raw({**GOOD, "request": {**GOOD["request"], "namespace": "Shop"}}), NOT_A_NAMESPACE),
    (raw({**GOOD, "request": {**GOOD["request"], "namespace": "shop-"}}), NOT_A_NAMESPACE),
    (raw({**GOOD, "request": {**GOOD["request"], "namespace": "shop\n"}}), NOT_A_NAMESPACE),
    (raw({**GOOD, "request": {**GOOD["request"], "namespace": "a.b"}}), NOT_A_NAMESPACE),
], ids=["empty", "truncated", "not-utf8", "array", "v1beta1", "wrong-kind", "no-request",
        "empty-uid", "numeric-uid", "long-uid", "namespace-list", "kind-string", "deep-body",
        "deep-object", "namespace-64", "namespace-upper", "namespace-dash", "namespace-newline",
        "namespace-dot"])
def test_malformed_reviews(body: bytes, message: str) -> None:
    with pytest.raises(MalformedReview) as info:
        decode(body)
    assert info.value.message == message


def test_a_good_review_decodes() -> None:
    r = decode(raw(GOOD))
    assert (r.uid, r.namespace, r.operation, r.sub_resource) == (
        GOOD["request"]["uid"], "shop", "CREATE", "")
    assert r.pod_create and r.object == GOOD["request"]["object"]


@pytest.mark.parametrize("namespace", ["a", "kube-system", "a" * 63, "0-9", ""],
                         ids=["one", "dashed", "63", "digits", "cluster-scoped"])
def test_namespace_names_kubernetes_allows(namespace: str) -> None:
    assert decode(raw({**GOOD, "request": {**GOOD["request"], "namespace": namespace}})
                  ).namespace == namespace


@pytest.mark.parametrize("change", [
    {"operation": "UPDATE"}, {"operation": "DELETE"}, {"operation": "CONNECT"},
    {"subResource": "ephemeralcontainers"}, {"subResource": "binding"},
    {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
    {"resource": {"group": "", "version": "v1", "resource": "configmaps"}},
], ids=["update", "delete", "connect", "ephemeral", "binding", "deployment", "configmap"])
def test_anything_but_a_pod_create_is_admitted_unchanged(change: dict[str, Any]) -> None:
    r = decode(raw({**GOOD, "request": {**GOOD["request"], **change}}))
    assert admit(r, CONFIG) == Skip("not_a_pod_create")
    assert answer(r.uid, Skip("not_a_pod_create")) == {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "response": {"uid": r.uid, "allowed": True}}


def test_a_patch_answer() -> None:
    ops = ({"op": "add", "path": "/metadata/annotations/a~1b", "value": "c"},)
    got = answer("u-1", Patch(ops, ("careful",)))
    response = got["response"]
    assert response == {"uid": "u-1", "allowed": True, "patchType": "JSONPatch",
                        "patch": response["patch"], "warnings": ["careful"]}
    assert json.loads(base64.b64decode(response["patch"])) == list(ops)


def test_warnings_are_bounded_as_the_api_server_wants() -> None:
    long = "w" * 1000
    response = answer("u", Patch(({"op": "add", "path": "/x", "value": 1},),
                                 tuple(f"{i}{long}" for i in range(40))))["response"]
    assert all(len(w) <= 256 for w in response["warnings"])
    assert sum(len(w) for w in response["warnings"]) <= 4000
    assert response["warnings"][0].endswith("...")


@pytest.mark.parametrize(("code", "reason"), [(400, "BadRequest"), (403, "Forbidden"),
                                              (500, "InternalError")])
def test_a_refusal_answer(code: int, reason: str) -> None:
    assert answer("u", Refusal("ephemeral-broker/mode: expected native", code)) == {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "response": {"uid": "u", "allowed": False, "status": {
            "status": "Failure", "code": code, "reason": reason,
            "message": "ephemeral-broker/mode: expected native"}}}


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=30)
KEYS = ["metadata", "spec", "labels", "annotations", "containers", "initContainers", "volumes",
        "volumeMounts", "name", "ephemeral-broker/inject", "ephemeral-broker/credential-db",
        "restartPolicy", "ports", "containerPort", "securityContext", "mountPath", "os"]
POD_ISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from(["true", "Always", "db", ""]),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(KEYS), children, max_size=5),
    max_leaves=40)


def _through(body: bytes) -> dict[str, Any] | None:
    try:
        r = decode(body)
    except MalformedReview:
        return None
    out = answer(r.uid, admit(r, CONFIG))
    json.dumps(out)
    return out


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(JSON)
def test_any_json_body_is_answered_or_refused_as_malformed(value: Any) -> None:
    _through(json.dumps(value).encode())


NAMES = st.sampled_from(["app", "db", "ephemeral-broker-agent", "v"])


def odd(regular: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the shape a pod has there, sometimes anything."""
    return st.one_of(regular, regular, regular, POD_ISH)


MOUNT_ST = st.fixed_dictionaries({}, optional={
    "name": odd(NAMES), "mountPath": odd(st.sampled_from(["/var/run/ephemeral-broker", "/x"])),
    "readOnly": POD_ISH})
CONTAINER_ST = st.fixed_dictionaries({"name": odd(NAMES)}, optional={
    "image": odd(st.just("img")), "volumeMounts": odd(st.lists(odd(MOUNT_ST), max_size=3)),
    "ports": odd(st.lists(odd(st.fixed_dictionaries({"containerPort": odd(st.sampled_from(
        [8080, 8399]))})), max_size=2)),
    "securityContext": odd(st.fixed_dictionaries({}, optional={"runAsUser": odd(st.sampled_from(
        [0, 1000]))})),
    "restartPolicy": odd(st.just("Always"))})
SPEC_ST = st.fixed_dictionaries({"containers": odd(st.lists(odd(CONTAINER_ST), min_size=1,
                                                             max_size=3))},
                                optional={
    "initContainers": odd(st.lists(odd(CONTAINER_ST), max_size=3)),
    "volumes": odd(st.lists(odd(st.fixed_dictionaries({"name": odd(NAMES)})), max_size=3)),
    "shareProcessNamespace": POD_ISH, "os": odd(st.just({"name": "linux"})),
    "securityContext": odd(st.fixed_dictionaries({}, optional={
        "fsGroup": POD_ISH, "runAsUser": POD_ISH})),
    "terminationGracePeriodSeconds": POD_ISH, "hostNetwork": POD_ISH,
    "serviceAccountName": POD_ISH})
ANNOTATIONS_ST = st.dictionaries(
    st.sampled_from(["ephemeral-broker/" + k for k in (
        "credential-db", "format-db", "perms-db", "command-db", "signal-db", "mode",
        "containers", "status", "agent-cpu-request", "template-db", "keygen-db")]),
    odd(st.sampled_from(["app-db", "template", "0400", '["a"]', "SIGHUP:x", "sidecar", "app",
                         "injected", "10m", "${a}", "ec-p256"])), max_size=5)
# Opted in (or the decision stops at the door), everything below odd now and then.
POD_ST = st.fixed_dictionaries({
    "metadata": st.fixed_dictionaries({
        "labels": st.just({"ephemeral-broker/inject": "true"}),
        "annotations": ANNOTATIONS_ST.map(lambda a: {"ephemeral-broker/inject": "true", **a})}),
    "spec": odd(SPEC_ST)})


@settings(max_examples=600, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(POD_ST, st.dictionaries(st.sampled_from(KEYS), POD_ISH, max_size=4)))
def test_any_pod_body_gets_an_answer_echoing_the_uid(obj: Any) -> None:
    out = _through(json.dumps(review(obj)).encode())
    assert out is not None
    assert out["response"]["uid"] == GOOD["request"]["uid"]


def test_review_is_a_plain_value() -> None:
    r = decode(raw(GOOD))
    assert isinstance(r, Review) and r == decode(raw(GOOD))
