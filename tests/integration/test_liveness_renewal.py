"""Liveness-gated renewal and the pod watch, configured through the broker's settings: the
real broker (PostgreSQL, OpenBao) asks a loopback Kubernetes API server (tests/harness/kube.py)
whether the token's pod still exists before renewing, and terminates it if not."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.harness.api import bearer, wait_job
from tests.harness.kube import FakeKubeApi, load_pods
from tests.harness.wait import eventually

POD = load_pods()["api-6f7c9d8b5-x2kqp"]
UID = POD["metadata"]["uid"]


def _claims(pod: dict[str, Any]) -> dict[str, Any]:
    meta = pod["metadata"]
    return {"kubernetes.io": {"namespace": meta["namespace"],
                              "pod": {"name": meta["name"], "uid": meta["uid"]}}}


# The dev issuer, made to read instance ids as a kubernetes issuer does (the pod's uid).
POD_ISSUER = {"liveness": {"check": "kubernetes", "cache_s": 0},
              "instance_claim": ["kubernetes.io", "pod", "uid"]}


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubeApi]:
    api = FakeKubeApi(max_watch_s=10)
    await api.start()
    yield api
    await api.stop()


async def _pod_with_a_login(make_broker, kube, http) -> tuple[Any, dict[str, Any]]:
    """A broker whose dev issuer asks the loopback API server about pods, and a database
    login issued to the running pod POD."""
    kube.set_pods([POD], rv="100")
    b = await make_broker(
        overrides={"kubernetes": {"api_url": kube.url, "token_file": None, "ca_file": None}},
        issuer_overrides=POD_ISSUER)
    token = b.issuer.mint(instance=UID, workload="payments", claims=_claims(POD))
    async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-db"},
                         headers=bearer(token)) as resp:
        cred = await resp.json()
    assert resp.status == 201, cred
    return b, cred


async def _renew(http, b, lease_id: str, instance: str) -> tuple[int, Any]:
    token = b.issuer.mint(instance=instance, workload="payments", claims=_claims(POD))
    async with http.post(f"{b.url}/v1/leases/{lease_id}/renew", headers=bearer(token)) as resp:
        return resp.status, await resp.json()


async def test_renewal_asks_the_api_server_and_terminates_a_gone_pod(make_broker, kube, http,
                                                                     vault):
    b, cred = await _pod_with_a_login(make_broker, kube, http)

    status, renewed = await _renew(http, b, cred["lease_id"], UID)
    assert status == 200, renewed
    meta = POD["metadata"]
    assert [g.path for g in kube.gets()] == [
        f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"]

    # The pod is replaced by another with the same name: a different uid is a gone pod.
    other = copy.deepcopy(POD)
    other["metadata"]["uid"] = "00000000-0000-4000-8000-000000000001"
    kube.set_pods([other], rv="101")
    status, body = await _renew(http, b, cred["lease_id"], UID)
    assert (status, body["error"]["code"]) == (409, "instance_terminated")
    shown = await wait_job(http, b, UID)
    assert shown["state"] == "terminated"
    assert shown["job"]["requested_by"] == "liveness:dev"
    assert not vault.lease_exists(shown["leases"][0]["vault_lease_id"])

    async with http.get(f"{b.url}/metrics") as resp:
        text = await resp.text()
    assert 'broker_liveness_checks{issuer="dev",outcome="alive"} 1.0' in text
    assert 'broker_liveness_checks{issuer="dev",outcome="gone"} 1.0' in text


async def test_an_unreachable_api_server_does_not_stop_renewals(make_broker, kube, http):
    b, cred = await _pod_with_a_login(make_broker, kube, http)
    await kube.stop()
    status, renewed = await _renew(http, b, cred["lease_id"], UID)
    assert status == 200, renewed
    assert b.broker.components.service.liveness_outcomes["dev"].counts()["unknown"] == 1


async def test_the_watch_configured_in_settings_terminates_a_deleted_pod(make_broker, kube,
                                                                         http, vault):
    kube.set_pods([POD], rv="200")
    b = await make_broker(overrides={"kubernetes": {
        "api_url": kube.url, "token_file": None, "ca_file": None, "watch": True,
        "issuer": "dev"}}, issuer_overrides={"instance_claim": ["kubernetes.io", "pod", "uid"]})
    token = b.issuer.mint(instance=UID, workload="payments", claims=_claims(POD))
    async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-db"},
                         headers=bearer(token)) as resp:
        assert resp.status == 201, await resp.text()
    await eventually(lambda: bool(kube.watch_queries()), "the watch started")
    deleted = copy.deepcopy(POD)
    deleted["metadata"]["resourceVersion"] = "201"
    await kube.emit([json.dumps({"type": "DELETED", "object": deleted}).encode() + b"\n"])
    shown = await wait_job(http, b, UID)
    assert shown["job"]["requested_by"] == "events:kubernetes"
    assert [x["state"] for x in shown["leases"]] == ["revoked"]
    assert not vault.lease_exists(shown["leases"][0]["vault_lease_id"])
    async with http.get(f"{b.url}/metrics") as resp:
        text = await resp.text()
    assert 'broker_termination_events{outcome="terminated",source="kubernetes"} 1.0' in text
