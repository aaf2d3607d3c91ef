"""Bulk revocation end to end on real OpenBao and PostgreSQL: the blast radius first
(changing nothing), ``brokerctl revoke`` with selectors and a reason, its confirmations,
idempotence, never-seen ids, and the API's refusals."""

from __future__ import annotations

import json

from tests.integration.test_cli import ctl_env, run


async def issue(broker, http, instance, role, **claims):
    token = broker.token(instance, workload=claims.pop("workload", "batch"), claims=claims)
    async with http.post(f"{broker.url}/v1/credentials", json={"role": role},
                         headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 201, await resp.text()
        return await resp.json()


async def post(http, broker, path, body):
    async with http.post(f"{broker.url}{path}", json=body, headers=broker.admin()) as resp:
        return resp.status, await resp.json()


async def test_bulk_revoke_with_a_dry_run_first(broker, http, pg):
    db = await issue(broker, http, "i-b0", "dev-db", team="red")
    for i in range(3):
        await issue(broker, http, f"i-b{i}", "dev-cert", team="red" if i < 3 else "blue")
    await issue(broker, http, "i-b3", "dev-cert", team="blue")
    await issue(broker, http, "i-o", "dev-cert", team="red", workload="other")
    env = ctl_env(broker.url)
    select = ["--workload", "batch", "--claim", "team=red"]

    before = broker.store_snapshot()
    code, out, err = await run("broker.cli.ctl", "revoke", *select, "--dry-run", "-o", "json",
                               env=env)
    assert code == 0, err
    radius = json.loads(out)
    assert (radius["instances"], radius["leases"]["live"]) == (3, 4)
    assert radius["leases"]["by_role"] == {"dev-cert": 3, "dev-db": 1}
    assert radius["leases"]["by_engine"] == {"database": 1, "pki": 3}
    assert radius["workloads"]["top"] == [{"workload": "batch", "instances": 3}]
    assert radius["sample"] == ["i-b0", "i-b1", "i-b2"]
    code, out, _ = await run("broker.cli.ctl", "revoke", *select, "--dry-run", env=env)
    assert code == 0 and out.startswith("dry run: nothing was changed. This selection reaches 3")
    assert broker.store_snapshot() == before

    code, _, err = await run("broker.cli.ctl", "revoke", *select, env=env)
    assert (code, "--yes" in err) == (2, True), err
    code, _, err = await run("broker.cli.ctl", "revoke", *select, "--yes", env=env)
    assert (code, "--reason" in err) == (2, True)
    code, _, err = await run("broker.cli.ctl", "revoke", *select, "--max", "2", "--reason", "x",
                             env=env)
    assert (code, "selection_too_large" in err) == (1, True)
    assert broker.store_snapshot() == before

    code, out, err = await run("broker.cli.ctl", "revoke", *select, "--yes", "--reason",
                               "key leaked", "--incident", "INC-9", "--wait", env=env)
    assert code == 0, err
    assert out.splitlines()[0] == (
        "terminated 3 instance(s); 4 live lease(s) queued for revocation")
    assert "done: 3 job(s) done, 0 failed" in out and "instances 3/3 done" in err
    assert not pg.role_exists(db["data"]["username"])
    jobs = {r["instance_id"]: r for r in broker.rows("revocation_jobs")}
    assert sorted(jobs) == ["i-b0", "i-b1", "i-b2"]
    assert {(r["reason"], r["incident"], r["requested_by"]) for r in jobs.values()} == {
        ("key leaked", "INC-9", "operator:admin")}
    states = {r["instance_id"]: r["state"] for r in broker.rows("instances")}
    assert (states["i-b3"], states["i-o"]) == ("active", "active")

    # Again: nothing new is terminated.
    code, out, err = await run("broker.cli.ctl", "-o", "json", "revoke", *select, "--yes",
                               "--reason", "key leaked", env=env)
    assert code == 0, err
    assert json.loads(out)["terminated"] == []
    assert len(broker.rows("revocation_jobs")) == 3


async def test_never_seen_ids_are_tombstoned_and_said(broker, http):
    env = ctl_env(broker.url)
    await issue(broker, http, "i-real", "dev-cert")
    code, out, _ = await run("broker.cli.ctl", "revoke", "--instance", "i-typo", env=env)
    assert code == 9
    assert out.startswith("instance i-typo: never seen: tombstoned, 0 leases; revocation job")
    code, out, _ = await run("broker.cli.ctl", "-o", "json", "revoke", "--instance", "i-real",
                             "--instance", "i-typo2", "--yes", "--reason", "cleanup", env=env)
    assert code == 9
    result = json.loads(out)
    assert result["never_seen"] == ["i-typo2"]
    assert sorted(t["instance_id"] for t in result["terminated"]) == ["i-real", "i-typo2"]
    states = {r["instance_id"]: r["state"] for r in broker.rows("instances")}
    assert states["i-typo2"] in ("terminating", "terminated")
    # The single-instance answer says it too; a real instance is not "never seen".
    status, answer = await post(http, broker, "/v1/instances/i-real/terminate", None)
    assert (status, answer["never_seen"]) == (202, False)


async def test_the_api_refuses_what_it_cannot_do(broker, http):
    for i in range(2):
        await issue(broker, http, f"i-r{i}", "dev-cert")
    before = broker.store_snapshot()
    cases = [
        ("/v1/admin/selection", {}, 400, "empty_selection"),
        ("/v1/admin/selection", {"selection": {"roles": ["Bad"]}}, 400, "invalid_selection"),
        ("/v1/admin/terminations", {"selection": {"workloads": ["batch"]}}, 400,
         "reason_required"),
        ("/v1/admin/terminations", {"selection": {"workloads": ["batch"]}, "reason": "x",
                                    "max": 1}, 409, "selection_too_large"),
        ("/v1/admin/terminations", {"selection": {"workloads": ["batch"]}, "batch": 5000}, 400,
         "invalid_field"),
    ]
    for path, body, status, code in cases:
        got = await post(http, broker, path, body)
        assert (got[0], got[1]["error"]["code"]) == (status, code), (path, body)
    assert broker.store_snapshot() == before
