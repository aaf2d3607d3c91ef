"""The README's walk-through on a real broker (OpenBao, PostgreSQL store), every answer
pinned whole: status, the headers a client relies on, and the JSON body with volatile
values (ids, times, Vault-generated secrets, certificates) masked."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from tests.contract.golden import Masker, assert_golden
from tests.harness.api import bearer, wait_job

INSTANCE = "i-golden"
HEADERS = ("Content-Type", "Cache-Control")


async def call(http: aiohttp.ClientSession, method: str, url: str, *,
               headers: dict[str, str], json: Any = None) -> dict[str, Any]:
    async with http.request(method, url, headers=headers, json=json) as resp:
        raw = await resp.read()
        body = await resp.json() if raw else None
        return {"status": resp.status, "body": body,
                "headers": {h: resp.headers[h] for h in HEADERS if h in resp.headers}}


def shape(report: dict[str, Any]) -> dict[str, str]:
    """Keys and value types only: a reconcile pass's figures and samples depend on what
    other tests left in the shared OpenBao."""
    return {k: type(v).__name__ for k, v in report.items()}


def by_role(answer: dict[str, Any]) -> dict[str, Any]:
    """Leases in a stable order: the store orders them by (random) lease id."""
    answer["body"]["leases"].sort(key=lambda x: x["role"])
    return answer


async def test_walkthrough_answers_are_unchanged(broker, http):
    mask = Masker()
    workload = bearer(broker.token(INSTANCE))
    admin = broker.admin()
    url = broker.url
    steps: dict[str, Any] = {}

    cert = await call(http, "POST", f"{url}/v1/credentials", headers=workload,
                      json={"role": "dev-cert", "ttl": "15m"})
    assert cert["status"] == 201, cert
    steps["01 issue dev-cert"] = cert
    cert_id = cert["body"]["lease_id"]
    steps["02 renew dev-cert (pki is not renewable)"] = await call(
        http, "POST", f"{url}/v1/leases/{cert_id}/renew", headers=workload, json={"ttl": "20m"})

    db = await call(http, "POST", f"{url}/v1/credentials", headers=workload,
                    json={"role": "dev-db", "ttl": "2m"})
    assert db["status"] == 201, db
    steps["03 issue dev-db"] = db
    db_id = db["body"]["lease_id"]
    steps["04 renew dev-db"] = await call(
        http, "POST", f"{url}/v1/leases/{db_id}/renew", headers=workload, json={"ttl": "20m"})

    steps["05 show instance (active)"] = by_role(await call(
        http, "GET", f"{url}/v1/instances/{INSTANCE}", headers=admin))
    steps["06 list leases of the instance"] = by_role(await call(
        http, "GET", f"{url}/v1/admin/leases?instance={INSTANCE}", headers=admin))
    # Two leases, a page of one: 'next' on the first page only (there is no third).
    first = await call(http, "GET", f"{url}/v1/admin/leases?instance={INSTANCE}&limit=1",
                       headers=admin)
    cursor = first["body"]["next"]
    assert cursor == first["body"]["leases"][0]["lease_id"], first
    second = await call(
        http, "GET", f"{url}/v1/admin/leases?instance={INSTANCE}&limit=1&after={cursor}",
        headers=admin)
    assert second["body"]["next"] is None and {cursor, second["body"]["leases"][0][
        "lease_id"]} == {cert_id, db_id}, second
    # Which lease comes first follows the random ids: the pages are pinned together.
    steps["07-08 list leases, a page of 1 and the page after next"] = by_role({
        "status": [first["status"], second["status"]],
        "body": {"leases": first["body"]["leases"] + second["body"]["leases"],
                 "next": [first["body"]["next"] is not None, second["body"]["next"]]}})

    steps["09 release dev-db"] = await call(
        http, "DELETE", f"{url}/v1/leases/{db_id}", headers=workload)
    steps["10 release dev-db again (idempotent)"] = await call(
        http, "DELETE", f"{url}/v1/leases/{db_id}", headers=workload)
    steps["11 renew released dev-db"] = await call(
        http, "POST", f"{url}/v1/leases/{db_id}/renew", headers=workload)

    steps["12 terminate"] = await call(
        http, "POST", f"{url}/v1/instances/{INSTANCE}/terminate", headers=admin)
    await wait_job(http, broker, INSTANCE)
    steps["13 show instance (terminated)"] = by_role(await call(
        http, "GET", f"{url}/v1/instances/{INSTANCE}", headers=admin))
    steps["14 terminate again (idempotent)"] = await call(
        http, "POST", f"{url}/v1/instances/{INSTANCE}/terminate", headers=admin)
    steps["15 list jobs"] = await call(http, "GET", f"{url}/v1/admin/jobs", headers=admin)
    steps["16 list done jobs"] = await call(http, "GET", f"{url}/v1/admin/jobs?state=done",
                                            headers=admin)

    job_id = steps["12 terminate"]["body"]["job"]["job_id"]
    steps["16b retry a job that has not failed"] = await call(
        http, "POST", f"{url}/v1/admin/jobs/{job_id}/retry", headers=admin)

    steps["17 issue after termination"] = await call(
        http, "POST", f"{url}/v1/credentials", headers=workload, json={"role": "dev-cert"})
    steps["18 renew after termination"] = await call(
        http, "POST", f"{url}/v1/leases/{cert_id}/renew", headers=workload)
    steps["19 release after termination"] = await call(
        http, "DELETE", f"{url}/v1/leases/{cert_id}", headers=workload)

    report = await call(http, "POST", f"{url}/v1/admin/reconcile", headers=admin, json={})
    assert report["status"] == 200, report
    report["body"] = shape(report["body"])
    steps["20 reconcile (shape)"] = report

    steps["21 explain a granted role"] = await call(
        http, "POST", f"{url}/v1/admin/policy/explain", headers=admin,
        json={"token": broker.token("i-explain"), "role": "dev-cert", "ttl": "2h"})
    steps["22 explain a role no rule allows"] = await call(
        http, "POST", f"{url}/v1/admin/policy/explain", headers=admin,
        json={"token": broker.token("i-explain"), "role": "no-such-role"})
    steps["23 explain an invalid token"] = await call(
        http, "POST", f"{url}/v1/admin/policy/explain", headers=admin,
        json={"token": "garbage", "role": "dev-cert"})

    # The dev issuer's URL carries a port chosen per session.
    masked = mask(steps)
    assert_golden("walkthrough.json",
                  json.loads(json.dumps(masked).replace(broker.issuer.issuer, "<issuer-url>")))
