"""The pod watch and the kubernetes liveness check, end to end: the broker's real
Kubernetes client against a loopback API server that speaks the list-then-watch protocol
and replays recorded event streams (tests/harness/kube.py), and the real broker on
PostgreSQL and OpenBao behind ``terminate``."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.clock import FixedClock
from broker.events.pod_watch import PodWatch
from broker.identity.model import Identity
from broker.kubernetes.client import KubernetesClient
from broker.kubernetes.settings import KubernetesSettings
from broker.liveness.kubernetes import KubernetesLiveness
from tests.harness.api import issue, wait_job
from tests.harness.kube import FakeKubeApi, Injection, load_pods, load_stream
from tests.harness.proxy import FaultProxy
from tests.harness.wait import eventually

TOKEN = "kube-token-1"
PODS = load_pods()
A = PODS["api-6f7c9d8b5-x2kqp"]  # payments, running; watch-force-deleted.jsonl deletes it
B = PODS["api-6f7c9d8b5-m9wzt"]  # payments, running; watch-graceful-delete.jsonl
R = PODS["report-28573920-hx4vb"]  # payments, a Job's pod; watch-job-succeeded.jsonl
W = PODS["worker-0"]  # billing, running
GONE_WHILE_DOWN = "c0ffee00-1111-4222-8333-944445555666"  # a pod no list shows any more


def uid(pod: dict[str, Any]) -> str:
    return pod["metadata"]["uid"]


def with_phase(pod: dict[str, Any], phase: str) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    pod["status"]["phase"] = phase
    return pod


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubeApi]:
    api = FakeKubeApi(tokens={TOKEN}, max_watch_s=10)
    await api.start()
    yield api
    await api.stop()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def k8s_settings(kube: FakeKubeApi, token_file: Path, **kw: Any) -> KubernetesSettings:
    # A call to the fake API server in this process waits for this event loop, which
    # shares two cores with other runs: 5 s was passed under load (liveness unknown).
    values: dict[str, Any] = {"api_url": kube.url, "token_file": token_file, "ca_file": None,
                              "timeout_s": 30, "watch": True, "issuer": "dev"}
    return KubernetesSettings(**{**values, **kw})


def pod_watch(b: Any, settings: KubernetesSettings, *, known: bool = True,
              **kw: Any) -> PodWatch:
    issuer = settings.issuer or "dev"
    return PodWatch(
        settings, KubernetesClient(settings), b.broker.components.terminate,
        ((lambda: b.broker.components.ledgers.termination.active_instance_ids(issuer))
         if known else None),
        watch_timeout_s=10, backoff_base_s=0.05, backoff_max_s=0.3, **kw)


@contextlib.asynccontextmanager
async def watching(watch: PodWatch) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(watch.run(stop))
    try:
        yield task
    finally:
        stop.set()
        # Stopping is prompt, even with a watch open that the server holds for 10 s: well
        # before that hold ends, with room for a busy machine.
        await asyncio.wait_for(task, timeout=8.0)


async def first_watch(kube: FakeKubeApi, task: asyncio.Task[None]) -> None:
    await eventually(lambda: len(kube.watch_queries()) >= 1 or task.done(), "the first watch")
    assert not task.done()


def jobs(b: Any) -> dict[str, dict[str, Any]]:
    return {j["instance_id"]: j for j in b.rows("revocation_jobs")}


def states(b: Any) -> dict[str, str]:
    return {i["instance_id"]: i["state"] for i in b.rows("instances")}


def vault_lease(b: Any, instance_id: str) -> str:
    [lease] = [r for r in b.rows("leases") if r["instance_id"] == instance_id]
    return lease["vault_lease_id"]


async def issued(http: Any, b: Any, *pods_or_ids: Any) -> None:
    for p in pods_or_ids:
        status, body = await issue(http, b, p if isinstance(p, str) else uid(p), "dev-db")
        assert status == 201, body


# -- the watch ------------------------------------------------------------------------

async def test_a_deleted_pod_terminates_its_instance_and_vault_revokes_its_leases(
        make_broker, kube, token_file, http, vault):
    b = await make_broker()
    await issued(http, b, A, B)
    kube.set_pods([A, B, W], "41200")
    watch = pod_watch(b, k8s_settings(kube, token_file))
    async with watching(watch) as task:
        await first_watch(kube, task)
        assert jobs(b) == {}  # every instance's pod is listed: nothing to terminate
        await kube.emit(load_stream("watch-force-deleted.jsonl"))
        await eventually(lambda: watch.resource_version == "41231", "the DELETED event handled")
        shown = await wait_job(http, b, uid(A))
    assert shown["state"] == "terminated" and shown["job"]["state"] == "done"
    assert [x["state"] for x in shown["leases"]] == ["revoked"]
    [job] = jobs(b).values()
    assert (job["instance_id"], job["requested_by"]) == (uid(A), "events:kubernetes")
    assert not vault.lease_exists(vault_lease(b, uid(A)))
    assert vault.lease_exists(vault_lease(b, uid(B)))
    assert states(b)[uid(B)] == "active"
    assert dict(watch.stats) == {"terminated": 1}
    assert [q["resourceVersion"] for q in kube.watch_queries()] == ["41200"]
    assert {r.token for r in kube.requests} == {TOKEN}


async def test_a_pod_in_its_grace_period_keeps_its_credentials_until_its_containers_stop(
        make_broker, kube, token_file):
    b = await make_broker()
    kube.set_pods([A, B], "41200")
    watch = pod_watch(b, k8s_settings(kube, token_file))
    graceful = load_stream("watch-graceful-delete.jsonl")
    async with watching(watch) as task:
        await first_watch(kube, task)
        await kube.emit(graceful[:1])  # deletionTimestamp set, containers still running
        await eventually(lambda: watch.resource_version == "41240", "the MODIFIED event handled")
        assert jobs(b) == {}
        await kube.emit(graceful[1:])  # phase Succeeded, then DELETED
        await eventually(lambda: watch.resource_version == "41247", "the DELETED event handled")
    assert list(jobs(b)) == [uid(B)]
    # Terminated once, when the containers stopped; the DELETED after it costs nothing.
    assert dict(watch.stats) == {"terminated": 1}


async def test_a_bookmark_moves_the_position_the_next_watch_resumes_from(
        make_broker, kube, token_file):
    b = await make_broker()
    kube.set_pods([A, B], "41200")
    watch = pod_watch(b, k8s_settings(kube, token_file))
    async with watching(watch) as task:
        await first_watch(kube, task)
        await kube.emit(load_stream("watch-bookmark.jsonl"))
        await eventually(lambda: watch.stats["bookmarks"] == 1, "the bookmark handled")
        assert watch.resource_version == "41300"
        await kube.end_watches()  # as the server does at timeoutSeconds
        await eventually(lambda: len(kube.watch_queries()) == 2, "the next watch")
    first, second = kube.watch_queries()
    assert first == {"watch": "1", "allowWatchBookmarks": "true", "resourceVersion": "41200",
                     "timeoutSeconds": "10"}
    assert second == {**first, "resourceVersion": "41300"}
    assert kube.list_queries() == [{"limit": "500"}]  # resumed, not relisted
    assert dict(watch.stats) == {"bookmarks": 1}
    assert jobs(b) == {}


@pytest.mark.parametrize("expiry", [
    Injection(lines=load_stream("watch-expired.jsonl")),
    Injection(status=410),
], ids=["error-event-410", "http-410"])
async def test_an_expired_position_relists_and_a_pod_deleted_in_the_gap_is_terminated(
        make_broker, kube, token_file, http, vault, expiry):
    b = await make_broker()
    await issued(http, b, A, B)
    kube.queue_list([A, B, W], "41200")
    kube.queue_list([B, W], "41900")  # A was deleted while the watch was not looking
    kube.inject(expiry)
    watch = pod_watch(b, k8s_settings(kube, token_file))
    async with watching(watch) as task:
        await first_watch(kube, task)
        await eventually(lambda: len(kube.watch_queries()) == 2, "the watch after the relist")
        shown = await wait_job(http, b, uid(A))
    assert shown["job"]["state"] == "done"
    assert list(jobs(b)) == [uid(A)]
    assert not vault.lease_exists(vault_lease(b, uid(A)))
    assert vault.lease_exists(vault_lease(b, uid(B)))
    assert [q["resourceVersion"] for q in kube.watch_queries()] == ["41200", "41900"]
    assert len(kube.list_queries()) == 2
    assert dict(watch.stats) == {"relists": 1, "terminated": 1}  # routine: not an error


@pytest.mark.parametrize(("namespace", "expected"), [
    (None, {GONE_WHILE_DOWN, uid(R)}),
    # A namespace-scoped watch does not see the whole issuer: an instance missing from
    # its list is no evidence that the pod is gone.
    ("payments", set()),
], ids=["cluster-wide", "namespace-scoped"])
async def test_instances_the_store_knows_but_the_list_lacks_are_terminated_at_start(
        make_broker, kube, token_file, http, vault, namespace, expected):
    b = await make_broker()
    await issued(http, b, A, R, GONE_WHILE_DOWN)
    kube.set_pods([A, with_phase(R, "Succeeded"), W], "41200")
    watch = pod_watch(b, k8s_settings(kube, token_file, namespace=namespace))
    async with watching(watch) as task:
        await first_watch(kube, task)
        for instance in expected:
            await wait_job(http, b, instance)
    assert set(jobs(b)) == expected
    assert states(b)[uid(A)] == "active"
    for instance in (uid(A), uid(R), GONE_WHILE_DOWN):
        assert vault.lease_exists(vault_lease(b, instance)) is (instance not in expected)
    assert watch.stats["terminated"] == len(expected)
    path = "/api/v1/pods" if namespace is None else f"/api/v1/namespaces/{namespace}/pods"
    assert {r.path for r in kube.requests} == {path}


async def test_a_store_outage_leaves_the_event_unacknowledged_until_it_is_recorded(
        make_broker, pg, kube, token_file, http, vault):
    proxy = FaultProxy(pg.host, pg.port)
    await proxy.start()
    name = await asyncio.to_thread(pg.create_database)
    try:
        b = await make_broker(store_url=f"postgresql://postgres@127.0.0.1:{proxy.port}/{name}")
        await issued(http, b, A)
        kube.set_pods([A, B], "41200")
        watch = pod_watch(b, k8s_settings(kube, token_file))
        async with watching(watch) as task:
            await first_watch(kube, task)
            proxy.cut()
            await kube.emit(load_stream("watch-force-deleted.jsonl"))
            await eventually(lambda: watch.stats["errors"] >= 2, "retries while the store is down")
            # The MODIFIED before it needed no store; the DELETED is not acknowledged.
            assert watch.resource_version == "41230"
            assert watch.stats["terminated"] == 0
            proxy.restore()
            await eventually(lambda: watch.stats["terminated"] == 1,
                             "terminated once the store is back")
            assert watch.resource_version == "41231"
            shown = await wait_job(http, b, uid(A))
        assert shown["job"]["state"] == "done"
        direct = dataclasses.replace(b, store_url=pg.url(name))  # not through the proxy
        assert list(jobs(direct)) == [uid(A)]
        assert not vault.lease_exists(vault_lease(direct, uid(A)))
        positions = [q["resourceVersion"] for q in kube.watch_queries()]
        assert positions[0] == "41200" and len(positions) >= 3
        assert set(positions[1:]) == {"41230"}  # every retry resumed before the DELETED
        assert watch.stats["relists"] == 0 and len(kube.list_queries()) == 1
    finally:
        await proxy.stop()
        await asyncio.to_thread(pg.drop_database, name)


GARBAGE = {
    "truncated-json": [load_stream("watch-force-deleted.jsonl")[1][:300]],
    "not-json": [b"<html><body><h1>502 Bad Gateway</h1></body></html>"],
    "json-not-an-event": [b'["DELETED"]'],
    "oversized-line": [b'{"type":"MODIFIED","object":{"metadata":{"annotations":{"x":"'
                       + b"a" * (100 * 1024) + b'"}}}}'],
}


async def test_garbled_lines_relist_and_the_watch_carries_on(make_broker, kube, token_file):
    b = await make_broker()
    kube.set_pods([A, B], "41200")
    watch = pod_watch(b, k8s_settings(kube, token_file), max_line_bytes=64 * 1024)
    async with watching(watch) as task:
        await first_watch(kube, task)
        for n, (case, lines) in enumerate(GARBAGE.items(), start=1):
            kube.inject(Injection(lines=lines))
            await kube.end_watches()  # the next watch gets the garbage
            await eventually(lambda n=n: len(kube.list_queries()) == n + 1, f"{case}: relist")
            # per case: the watch that was ended, the one with the garbage; then one more
            await eventually(lambda n=n: len(kube.watch_queries()) == 2 * n + 1,
                             f"{case}: the watch after the relist")
            assert dict(watch.stats) == {"relists": n, "errors": n}, case
            assert not task.done(), case
        await kube.emit(load_stream("watch-force-deleted.jsonl"))
        await eventually(lambda: watch.stats["terminated"] == 1, "the next deletion handled")
    assert list(jobs(b)) == [uid(A)]  # the relists compared equal lists: nothing else
    # Each relist started over from the list; each watch from that list's position.
    assert {q["resourceVersion"] for q in kube.watch_queries()} == {"41200"}


async def test_a_dropped_connection_resumes_from_the_acknowledged_position(
        make_broker, kube, token_file):
    b = await make_broker()
    kube.set_pods([A, B], "41200")
    await kube.emit(load_stream("watch-force-deleted.jsonl"))
    kube.inject(Injection(drop_after=1))  # the DELETED line is cut in half
    watch = pod_watch(b, k8s_settings(kube, token_file))
    async with watching(watch) as task:
        await first_watch(kube, task)
        await eventually(lambda: watch.stats["terminated"] == 1, "the DELETED event handled")
    assert [q["resourceVersion"] for q in kube.watch_queries()] == ["41200", "41230"]
    assert len(kube.list_queries()) == 1
    assert dict(watch.stats) == {"errors": 1, "terminated": 1}
    assert list(jobs(b)) == [uid(A)]


async def test_an_instance_of_another_issuer_is_refused_and_the_watch_moves_on(
        make_broker, kube, token_file, http, vault):
    b = await make_broker()
    await issued(http, b, A)  # through the "dev" issuer
    kube.set_pods([A, R], "41200")
    watch = pod_watch(b, k8s_settings(kube, token_file, issuer="cluster-b"), known=False)
    async with watching(watch) as task:
        await first_watch(kube, task)
        await kube.emit(load_stream("watch-force-deleted.jsonl"))
        await kube.emit(load_stream("watch-job-succeeded.jsonl"))
        await eventually(lambda: watch.resource_version == "41320", "both events handled")
    assert dict(watch.stats) == {"refused": 1, "terminated": 1}
    assert states(b)[uid(A)] == "active"
    assert vault.lease_exists(vault_lease(b, uid(A)))
    # The Job's pod was never seen: it is tombstoned for cluster-b.
    assert list(jobs(b)) == [uid(R)]
    [row] = [i for i in b.rows("instances") if i["instance_id"] == uid(R)]
    # (its job, with nothing to revoke, may already have finished)
    assert row["issuer_name"] == "cluster-b"
    assert row["state"] in ("terminating", "terminated")


async def test_a_paged_list_is_read_to_its_end(make_broker, kube, token_file, http):
    b = await make_broker()
    await issued(http, b, W)
    kube.set_pods([A, B, R, W], "41200")
    watch = pod_watch(b, k8s_settings(kube, token_file), page_size=1)
    async with watching(watch) as task:
        await first_watch(kube, task)
    assert [q.get("continue") for q in kube.list_queries()] == [None, "1", "2", "3"]
    assert jobs(b) == {}  # W was on the last page


# -- liveness -------------------------------------------------------------------------

def identity(pod: dict[str, Any], *, instance_id: str | None = None,
             claims: dict[str, Any] | None = None) -> Identity:
    meta = pod["metadata"]
    now = datetime.now(UTC)
    k8s_claims = {"namespace": meta["namespace"],
                  "pod": {"name": meta["name"], "uid": meta["uid"]},
                  "serviceaccount": {"name": pod["spec"]["serviceAccountName"],
                                     "uid": "6a9d2f1c-3b5e-4c7a-8d0f-1e2b3c4d5e6f"}}
    return Identity(
        issuer_name="k8s", issuer="https://kubernetes.default.svc.cluster.local",
        subject=f"system:serviceaccount:{meta['namespace']}:{pod['spec']['serviceAccountName']}",
        instance_id=instance_id or meta["uid"],
        workload=f"{meta['namespace']}/{pod['spec']['serviceAccountName']}",
        issued_at=now, expires_at=now + timedelta(hours=1),
        claims={"kubernetes.io": k8s_claims} if claims is None else claims)


def terminating(pod: dict[str, Any]) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    pod["metadata"]["deletionTimestamp"] = "2026-05-11T10:14:07Z"
    return pod


def recreated(pod: dict[str, Any]) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    pod["metadata"]["uid"] = "7d1e3f5a-9b2c-4d6e-8f0a-1b3c5d7e9f11"
    return pod


LIVENESS = [
    pytest.param([A, B], identity(A), True, 1, id="running"),
    pytest.param([terminating(A)], identity(A), True, 1, id="in-grace-period"),
    pytest.param([B], identity(A), False, 1, id="not-found"),
    pytest.param([recreated(A)], identity(A), False, 1, id="same-name-another-uid"),
    pytest.param([with_phase(R, "Succeeded")], identity(R), False, 1, id="succeeded"),
    pytest.param([with_phase(R, "Failed")], identity(R), False, 1, id="failed"),
    pytest.param([A], identity(A, claims={"sub": "x"}), None, 0, id="claims-missing"),
    pytest.param([A], identity(A, claims={"kubernetes.io": {
        "namespace": "payments", "pod": {"name": "../../secrets/x"}}}), None, 0,
        id="name-not-dns-1123"),
]


@pytest.mark.parametrize(("pods", "who", "expected", "requests"), LIVENESS)
async def test_liveness_answers(kube, token_file, pods, who, expected, requests):
    kube.set_pods(pods, "41200")
    check = KubernetesLiveness(KubernetesClient(k8s_settings(kube, token_file)), cache_s=10)
    await check.start()
    try:
        assert await check.alive(who) is expected
    finally:
        await check.close()
    assert len(kube.gets()) == requests
    if requests:
        claim = who.claims["kubernetes.io"]
        ns, name = claim["namespace"], claim["pod"]["name"]
        assert kube.gets()[0].path == f"/api/v1/namespaces/{ns}/pods/{name}"


async def test_liveness_is_unknown_when_the_api_server_is_down_or_refuses(kube, token_file):
    kube.set_pods([A], "41200")
    check = KubernetesLiveness(KubernetesClient(k8s_settings(kube, token_file)), cache_s=10)
    await check.start()
    try:
        kube.tokens = {"another-token"}
        assert await check.alive(identity(A)) is None  # 401
        kube.tokens = {TOKEN}
        assert await check.alive(identity(A)) is True  # unknown answers are not cached
        await kube.stop()
        assert await check.alive(identity(B)) is None  # connection refused
    finally:
        await check.close()


async def test_liveness_answers_are_cached_and_false_is_final(kube, token_file):
    clock = FixedClock(datetime(2026, 5, 11, 10, 0, tzinfo=UTC))
    kube.set_pods([A], "41200")
    check = KubernetesLiveness(KubernetesClient(k8s_settings(kube, token_file)), cache_s=10,
                               clock=clock)
    await check.start()
    try:
        answers = await asyncio.gather(*(check.alive(identity(A)) for _ in range(20)))
        assert answers == [True] * 20 and len(kube.gets()) == 1  # one request for all
        kube.set_pods([], "41300")
        clock.advance(9)
        assert await check.alive(identity(A)) is True and len(kube.gets()) == 1
        clock.advance(2)
        assert await check.alive(identity(A)) is False and len(kube.gets()) == 2
        kube.set_pods([A], "41400")
        clock.advance(86400)
        assert await check.alive(identity(A)) is False and len(kube.gets()) == 2
    finally:
        await check.close()


async def test_a_rotated_token_is_read_again_and_never_logged(kube, token_file, caplog):
    caplog.set_level(logging.DEBUG)
    clock = FixedClock(datetime(2026, 5, 11, 10, 0, tzinfo=UTC))
    kube.set_pods([A], "41200")
    check = KubernetesLiveness(KubernetesClient(k8s_settings(kube, token_file)), cache_s=1,
                               clock=clock)
    await check.start()
    try:
        assert await check.alive(identity(A)) is True
        # The kubelet swaps a projected token in atomically (a new file).
        fresh = token_file.with_name("token.new")
        fresh.write_text("kube-token-2\n")
        os.replace(fresh, token_file)
        kube.tokens = {"kube-token-2"}
        clock.advance(2)
        assert await check.alive(identity(A)) is True
    finally:
        await check.close()
    assert [r.token for r in kube.gets()] == [TOKEN, "kube-token-2"]
    assert "kube-token" not in caplog.text
