"""The webhook's HTTP surface on loopback (plain HTTP here; TLS in
``tests/integration/test_injector_tls.py``): ``/mutate`` answers every review with a 200
AdmissionReview and anything else with a 400 JSON error, never a 5xx; ``/healthz``;
``/metrics`` counted by namespace; and the policy preview asked of a loopback server that
answers exactly as the contract for ``POST /v1/admin/policy/preview`` says."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import ConfigError
from broker.injector import server as server_module
from broker.injector.metrics import MAX_NAMESPACES, OTHER, InjectorMetrics
from broker.injector.model import Skip
from broker.injector.preview import PreviewClient
from broker.injector.server import Injector, InjectorServer, build_app
from broker.injector.settings import InjectorSettings
from tests.harness.wait import eventually
from tests.unit.injector.podkit import CONFIG, P, apply, check_injected, container, pod, review

ADMIN_TOKEN = "injector-admin-token-for-tests"
DB = {P + "credential-db": "app-db", P + "credential-cache": "app-redis"}


def sample(metrics: InjectorMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


@pytest.fixture
async def webhook() -> AsyncIterator[tuple[TestClient, InjectorMetrics]]:
    metrics = InjectorMetrics()
    async with TestClient(TestServer(build_app(Injector(CONFIG, metrics, None)))) as client:
        yield client, metrics


async def post(client: TestClient, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with client.post("/mutate", data=data,
                           headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json()


async def test_a_pod_is_injected_over_http(webhook: tuple[TestClient, InjectorMetrics]) -> None:
    client, metrics = webhook
    obj = pod({"containers": [container("app")]}, DB)
    status, body = await post(client, review(obj, uid="uid-1"))
    assert status == 200 and body["response"]["uid"] == "uid-1"
    ops = json.loads(__import__("base64").b64decode(body["response"]["patch"]))
    check_injected(obj, apply(obj, ops))
    assert sample(metrics, "broker_injector_admission_requests_total", namespace="shop") == 1
    assert sample(metrics, "broker_injector_injections_total", namespace="shop") == 1
    assert sample(metrics, "broker_injector_admission_seconds_count") == 1


async def test_outcomes_are_counted_by_namespace(
        webhook: tuple[TestClient, InjectorMetrics]) -> None:
    client, metrics = webhook
    good = pod({"containers": [container("app")]}, DB)
    bad = pod({"containers": [container("app")]}, {**DB, P + "mode": "x"})
    plain = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
             "spec": {"containers": [container("app")]}}
    for obj, ns in ((good, "a"), (good, "a"), (bad, "a"), (bad, "b"), (plain, "b"),
                    (good, "kube-system")):
        status, _ = await post(client, review(obj, namespace=ns))
        assert status == 200
    async with client.get("/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    assert 'broker_injector_injections_total{namespace="a"} 2.0' in text
    assert 'broker_injector_refusals_total{namespace="a"} 1.0' in text
    assert 'broker_injector_refusals_total{namespace="b"} 1.0' in text
    assert 'broker_injector_admission_requests_total{namespace="b"} 2.0' in text
    assert 'broker_injector_skips_total{reason="not_opted_in"} 1.0' in text
    assert 'broker_injector_skips_total{reason="namespace_skipped"} 1.0' in text
    assert sample(metrics, "broker_injector_admission_seconds_count") == 6


async def test_a_refusal_is_a_200_review_that_says_why(
        webhook: tuple[TestClient, InjectorMetrics]) -> None:
    client, _ = webhook
    obj = pod({"containers": [container("app")]}, {**DB, P + "perms-db": "0777"})
    status, body = await post(client, review(obj, uid="uid-2"))
    assert status == 200
    assert body["response"]["allowed"] is False and body["response"]["uid"] == "uid-2"
    assert body["response"]["status"]["code"] == 400
    assert body["response"]["status"]["message"].startswith("ephemeral-broker/perms-db: ")


@pytest.mark.parametrize(("body", "message"), [
    (b"not json", "the body is not JSON"),
    ({"kind": "AdmissionReview"}, "expected kind AdmissionReview, apiVersion admission.k8s.io/v1"),
    (b"[" * 100_000 + b"]" * 100_000, "the body nests too deeply to be a review"),
    (review({"metadata": {}, "spec": {"nodeSelector": "X"}}, uid="u"), "DEEP"),
    (review(pod({"containers": [container("app")]}), namespace="n" * 100_000),
     "request.namespace: expected a namespace name (a DNS-1123 label)"),
], ids=["not-json", "no-version", "deep", "deep-in-pod", "huge-namespace"])
async def test_what_is_not_a_review_gets_a_400_json_error(
        webhook: tuple[TestClient, InjectorMetrics], body: Any, message: str) -> None:
    client, metrics = webhook
    if message == "DEEP":  # an opted-in pod with a field nested far beyond any real one
        body = json.dumps(body).replace('"X"', "[" * 50_000 + "]" * 50_000).encode()
        message = "the body nests too deeply to be a review"
    status, got = await post(client, body)
    assert (status, got) == (400, {"error": {"code": "malformed_review", "message": message}})
    assert sample(metrics, "broker_injector_malformed_reviews_total") == 1
    assert sample(metrics, "broker_injector_admission_requests_total", namespace="shop") == 0


async def test_a_slow_decision_does_not_hold_up_the_webhook(
        webhook: tuple[TestClient, InjectorMetrics], monkeypatch: pytest.MonkeyPatch) -> None:
    """The decision runs off the event loop: while one is busy, /healthz answers."""
    client, _ = webhook
    started, release = threading.Event(), threading.Event()
    released: list[bool] = []
    real = server_module.admit

    def slow(*args: Any, **kwargs: Any) -> Any:
        started.set()
        released.append(release.wait(10))  # on the event loop, this would block /healthz
        return real(*args, **kwargs)

    monkeypatch.setattr(server_module, "admit", slow)
    pending = asyncio.create_task(post(client, review(pod({"containers": [container("app")]}))))
    try:
        await eventually(started.is_set, "the decision started")
        async with client.get("/healthz") as resp:
            assert resp.status == 200
    finally:
        release.set()
    status, body = await pending
    assert status == 200 and "patch" in body["response"]
    assert released == [True]


def test_namespace_labels_are_bounded() -> None:
    metrics = InjectorMetrics()
    outcome = Skip("not_a_pod_create")
    for i in range(MAX_NAMESPACES + 100):
        metrics.observe(f"ns-{i}", outcome, 0.001)
    metrics.observe("ns-0", outcome, 0.001)  # one seen before the cap keeps its own series
    values = [s.labels["namespace"]
              for family in metrics.registry.collect() for s in family.samples
              if s.name == "broker_injector_admission_requests_total"]
    assert len(values) == MAX_NAMESPACES + 1 and values.count(OTHER) == 1
    assert sample(metrics, "broker_injector_admission_requests_total", namespace=OTHER) == 100
    assert sample(metrics, "broker_injector_admission_requests_total", namespace="ns-0") == 2


async def test_http_errors_are_json(webhook: tuple[TestClient, InjectorMetrics]) -> None:
    client, _ = webhook
    async with client.get("/mutate") as resp:
        assert resp.status == 405
        assert (await resp.json())["error"]["code"] == "method_not_allowed"
    async with client.get("/nowhere") as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    async with client.post("/mutate", data=b"x" * (5 * 1024 * 1024)) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "payload_too_large"
    async with client.get("/healthz") as resp:
        assert resp.status == 200 and await resp.json() == {"status": "ok"}


async def test_a_bug_refuses_the_pod_with_a_sentence_not_a_5xx(
        webhook: tuple[TestClient, InjectorMetrics], monkeypatch: pytest.MonkeyPatch) -> None:
    client, metrics = webhook

    def broken(*_: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(server_module, "admit", broken)
    status, body = await post(client, review(pod({"containers": [container("app")]}, DB)))
    assert status == 200
    assert body["response"]["allowed"] is False
    assert body["response"]["status"] == {
        "status": "Failure", "code": 500, "reason": "InternalError",
        "message": "the injector failed unexpectedly; see its log"}
    assert sample(metrics, "broker_injector_refusals_total", namespace="shop") == 1


BODIES = st.one_of(
    st.binary(max_size=64),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                     max_size=3),
                 max_leaves=20).map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["metadata", "spec", "kind"]),
                    st.recursive(st.none() | st.text(max_size=5),
                                 lambda c: st.lists(c, max_size=3)
                                 | st.dictionaries(st.sampled_from(
                                     ["containers", "name", "annotations", "labels"]), c),
                                 max_leaves=15))
    .map(lambda obj: json.dumps(review(obj)).encode()),
)


def test_the_handler_never_answers_5xx() -> None:
    """Generated bodies through real HTTP on loopback: 200 or 400, nothing else."""
    loop = asyncio.new_event_loop()
    try:
        async def start() -> TestClient:
            app = build_app(Injector(CONFIG, InjectorMetrics(), None))
            started = TestClient(TestServer(app))
            await started.start_server()
            return started

        client = loop.run_until_complete(start())

        async def status_of(body: bytes) -> int:
            async with client.post("/mutate", data=body) as resp:
                await resp.read()
                return resp.status

        @settings(max_examples=300, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow,
                                         HealthCheck.function_scoped_fixture])
        @given(BODIES)
        def check(body: bytes) -> None:
            assert loop.run_until_complete(status_of(body)) in (200, 400)

        check()
        loop.run_until_complete(client.close())
    finally:
        loop.close()


# -- the policy preview -------------------------------------------------------------------

Verdicts = Callable[[dict[str, Any]], web.StreamResponse | Any]


class BrokerStub:
    """A loopback server answering ``POST /v1/admin/policy/preview`` in the contract's shape;
    it records what it was asked."""

    def __init__(self, answer: Verdicts) -> None:
        self.asked: list[tuple[str | None, dict[str, Any]]] = []
        self._answer = answer

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.asked.append((request.headers.get("Authorization"), body))
        result = self._answer(body)
        if asyncio.iscoroutine(result):
            result = await result
        return result


def contract_answer(refused: set[str]) -> Verdicts:
    def answer(body: dict[str, Any]) -> web.Response:
        k8s = body["claims"]["kubernetes.io"]
        return web.json_response({
            "issuer": body["issuer"],
            "identity": {"subject": body["claims"]["sub"],
                         "workload": f"{k8s['namespace']}/{k8s['serviceaccount']['name']}",
                         "instance_id": ""},
            "roles": [{"role": r, "granted": r not in refused,
                       "code": "role_not_permitted" if r in refused else None,
                       "reason": ("no rule applies to this identity (deny by default)"
                                  if r in refused else f"rule 'shop' allows role {r!r}"),
                       "rule": None if r in refused else "shop"}
                      for r in body["roles"]]})
    return answer


async def with_preview(tmp_path: Path, answer: Verdicts, *, strict: bool = False,
                       timeout_s: float = 2.0, url: str | None = None,
                       token: str | None = ADMIN_TOKEN) -> tuple[Any, BrokerStub, InjectorMetrics]:
    stub = BrokerStub(answer)
    broker_app = web.Application()
    broker_app.router.add_post("/v1/admin/policy/preview", stub.handle)
    broker = TestServer(broker_app)
    await broker.start_server()
    token_file = tmp_path / "admin-token"
    if token is not None:
        token_file.write_text(token + "\n")
    base = url or str(broker.make_url("")).rstrip("/")
    config = InjectorSettings(broker_url="https://b.svc:8300", issuer="k8s-prod", strict=strict,
                              preview={"broker_url": base, "token_file": str(token_file),
                                       "timeout_s": timeout_s})
    metrics = InjectorMetrics()
    session = aiohttp.ClientSession()
    client = PreviewClient(session, config.preview_url, token_file, timeout_s)
    webhook = TestClient(TestServer(build_app(Injector(config, metrics, client))))
    await webhook.start_server()

    async def close() -> None:
        await webhook.close()
        await session.close()
        await broker.close()

    return (webhook, close), stub, metrics


async def test_preview_warnings_for_refused_roles(tmp_path: Path) -> None:
    (client, close), stub, metrics = await with_preview(tmp_path, contract_answer({"app-redis"}))
    try:
        obj = pod({"containers": [container("app")], "serviceAccountName": "checkout"}, DB,
                  name="checkout-0")
        status, body = await post(client, review(obj))
        assert status == 200 and body["response"]["allowed"] is True
        assert body["response"]["warnings"] == [
            "ephemeral-broker/credential-cache: role 'app-redis' would be refused "
            "(role_not_permitted) for shop/checkout: ask your platform team or see "
            "`brokerctl policy explain`"]
        assert stub.asked == [(f"Bearer {ADMIN_TOKEN}", {
            "issuer": "k8s-prod",
            "claims": {"sub": "system:serviceaccount:shop:checkout",
                       "kubernetes.io": {"namespace": "shop",
                                         "serviceaccount": {"name": "checkout"},
                                         "pod": {"name": "checkout-0"}}},
            "roles": ["app-db", "app-redis"]})]
        assert sample(metrics, "broker_injector_policy_previews_total", outcome="answered") == 1
    finally:
        await close()


def oracle_answer(body: dict[str, Any]) -> web.Response:
    """What a real broker says: reasons that name its rules and whether a role exists."""
    reasons = {"payments-rw": "rule 'prod-payments' allows role 'payments-rw'",
               "orders-ro": "rules 'prod-payments' apply to this identity but none allows "
                            "role 'orders-ro'",
               "nope": "role 'nope' does not exist",
               "odd": "role 'odd' is locked by rule 'x'"}
    codes = {"payments-rw": None, "orders-ro": "role_not_permitted", "nope": "role_not_permitted",
             "odd": "Role Locked: see rule x"}
    return web.json_response({"roles": [
        {"role": r, "granted": codes[r] is None, "code": codes[r], "reason": reasons[r],
         "rule": "prod-payments" if codes[r] is None else None} for r in body["roles"]]})


@pytest.mark.parametrize("strict", [False, True], ids=["warning", "strict"])
async def test_the_brokers_reasons_never_reach_the_pods_creator(
        tmp_path: Path, strict: bool) -> None:
    """Whoever may create a pod must not learn the policy from admission: which rules
    exist, which apply to them, whether a role exists. Only role, code and whom."""
    (client, close), _, _ = await with_preview(tmp_path, oracle_answer, strict=strict)
    annotations = {P + "credential-a": "payments-rw", P + "credential-b": "orders-ro",
                   P + "credential-c": "nope", P + "credential-d": "odd"}
    try:
        obj = pod({"containers": [container("app")], "serviceAccountName": "api"}, annotations)
        status, body = await post(client, review(obj, namespace="payments"))
        assert status == 200
        said = (body["response"]["status"]["message"].split("; ") if strict
                else body["response"]["warnings"])
    finally:
        await close()
    hint = "for payments/api: ask your platform team or see `brokerctl policy explain`"
    assert sorted(said) == [
        f"{P}credential-b: role 'orders-ro' would be refused (role_not_permitted) {hint}",
        f"{P}credential-c: role 'nope' would be refused (role_not_permitted) {hint}",
        f"{P}credential-d: role 'odd' would be refused {hint}",
    ]
    for leak in ("prod-payments", "exist", "rule", "locked", "Locked", "apply"):
        assert all(leak not in s for s in said), leak


async def test_strict_refuses_a_pod_whose_role_is_refused(tmp_path: Path) -> None:
    (client, close), _, metrics = await with_preview(tmp_path, contract_answer({"app-redis"}),
                                                     strict=True)
    try:
        status, body = await post(client, review(pod({"containers": [container("app")]}, DB)))
        assert status == 200 and body["response"]["allowed"] is False
        assert body["response"]["status"]["code"] == 403
        assert body["response"]["status"]["reason"] == "Forbidden"
        assert "role 'app-redis' would be refused" in body["response"]["status"]["message"]
        status, body = await post(client, review(pod({"containers": [container("app")]},
                                                     {P + "credential-db": "app-db"})))
        assert body["response"]["allowed"] is True and "warnings" not in body["response"]
    finally:
        await close()


async def test_a_slow_broker_costs_a_warning_not_the_pod(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def slow(body: dict[str, Any]) -> web.Response:
        await release.wait()
        return contract_answer(set())(body)

    (client, close), _, metrics = await with_preview(tmp_path, slow, strict=True,
                                                     timeout_s=0.2)
    try:
        status, body = await post(client, review(pod({"containers": [container("app")]}, DB)))
        assert status == 200 and body["response"]["allowed"] is True
        assert body["response"]["warnings"] == [
            "the broker's policy preview is not available (no answer within 0.2s); the agent "
            "will find out at start-up whether its roles are granted"]
        assert sample(metrics, "broker_injector_policy_previews_total",
                      outcome="unavailable") == 1
    finally:
        release.set()
        await close()


async def test_an_unreachable_broker_costs_a_warning(tmp_path: Path) -> None:
    with __import__("socket").socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    (client, close), _, _ = await with_preview(tmp_path, contract_answer(set()), strict=True,
                                               url=url)
    try:
        _, body = await post(client, review(pod({"containers": [container("app")]}, DB)))
        assert body["response"]["allowed"] is True
        assert body["response"]["warnings"][0].startswith(
            "the broker's policy preview is not available (the broker is unreachable (")
    finally:
        await close()


@pytest.mark.parametrize(("status", "body", "said"), [
    (401, {"error": {"code": "admin_unauthorized", "message": "x"}},
     "the broker answered 401 admin_unauthorized"),
    (400, {"error": {"code": "invalid_issuer", "message": "x"}},
     "the broker answered 400 invalid_issuer"),
    (500, "oops", "the broker answered 500"),
    (200, {"roles": "all"}, "the broker's answer has no roles list"),
    (200, {"roles": [{"role": "app-db"}]}, "the broker's answer is not understood"),
], ids=["unauthorized", "unknown-issuer", "server-error", "no-roles", "no-granted"])
async def test_a_broker_that_cannot_answer_costs_a_warning(
        tmp_path: Path, status: int, body: Any, said: str) -> None:
    def answer(_: dict[str, Any]) -> web.Response:
        if isinstance(body, str):
            return web.Response(status=status, text=body)
        return web.json_response(body, status=status)

    (client, close), _, _ = await with_preview(tmp_path, answer, strict=True)
    try:
        _, got = await post(client, review(pod({"containers": [container("app")]}, DB)))
        assert got["response"]["allowed"] is True
        assert got["response"]["warnings"] == [
            f"the broker's policy preview is not available ({said}); the agent will find out "
            "at start-up whether its roles are granted"]
    finally:
        await close()


async def test_without_its_admin_token_the_injector_does_not_ask(tmp_path: Path) -> None:
    (client, close), stub, _ = await with_preview(tmp_path, contract_answer(set()), token=None)
    try:
        _, got = await post(client, review(pod({"containers": [container("app")]}, DB)))
        assert got["response"]["allowed"] is True
        assert "the admin token file" in got["response"]["warnings"][0]
        assert ADMIN_TOKEN not in json.dumps(got)
        assert stub.asked == []
    finally:
        await close()


async def test_no_preview_for_pods_that_are_not_injected(tmp_path: Path) -> None:
    (client, close), stub, _ = await with_preview(tmp_path, contract_answer(set()))
    try:
        plain = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                 "spec": {"containers": [container("app")]}}
        bad = pod({"containers": [container("app")]}, {**DB, P + "mode": "x"})
        for obj, ns, op in ((plain, "shop", "CREATE"), (bad, "shop", "CREATE"),
                            (pod({"containers": [container("app")]}, DB), "kube-system", "CREATE"),
                            (pod({"containers": [container("app")]}, DB), "shop", "UPDATE")):
            await post(client, review(obj, namespace=ns, operation=op))
        assert stub.asked == []
    finally:
        await close()


# -- the broker's CA for the agents (agent.ca_file) -------------------------------------


def _agent_ca_pem(body: dict[str, Any]) -> str | None:
    ops = json.loads(base64.b64decode(body["response"]["patch"]))
    (agent,) = next(op["value"] for op in ops if op["path"] == "/spec/initContainers")
    args = agent["args"]
    return args[args.index("--ca-pem") + 1] if "--ca-pem" in args else None


async def test_each_pod_gets_the_ca_in_agent_ca_file_as_it_is_at_admission(
        tmp_path: Path) -> None:
    first, second = (trustme.CA().cert_pem.bytes().decode() for _ in range(2))
    ca_file = tmp_path / "ca.crt"
    ca_file.write_text(first)
    config = InjectorSettings(listen="127.0.0.1:0", broker_url="https://b.svc:8300",
                              agent={"ca_file": str(ca_file)})
    server = InjectorServer(config, insecure_http=True)
    url = await server.start()
    obj = pod({"containers": [container("app")]}, DB)

    async def admitted_ca() -> str | None:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/mutate", json=review(obj)) as resp:
                body = await resp.json()
        check_injected(obj, apply(obj, json.loads(base64.b64decode(
            body["response"]["patch"]))), config, _agent_ca_pem(body))
        return _agent_ca_pem(body)

    def replace(text: str) -> None:  # a new inode, as the kubelet swaps a volume's files
        (tmp_path / "ca.new").write_text(text)
        os.replace(tmp_path / "ca.new", ca_file)

    try:
        assert await admitted_ca() == first
        replace(second)  # the CA rotated: pods created from now on trust the new one
        assert await admitted_ca() == second
        assert server.ca is not None and server.ca.reloads == 1
        replace("-----BEGIN CERTIFICATE-----\ntruncated")  # half written: keep the last good
        assert await admitted_ca() == second
        assert (server.ca.reloads, server.ca.failures) == (1, 1)
    finally:
        await server.close()


def test_an_agent_ca_file_that_is_not_a_ca_stops_start_up(tmp_path: Path) -> None:
    config = InjectorSettings(listen="127.0.0.1:0", broker_url="https://b.svc:8300",
                              agent={"ca_file": str(tmp_path / "ca.crt")})
    with pytest.raises(ConfigError) as err:
        InjectorServer(config, insecure_http=True)
    assert str(err.value) == (f"agent.ca_file: {tmp_path}/ca.crt: No such file or directory: "
                              f"{tmp_path}/ca.crt")
