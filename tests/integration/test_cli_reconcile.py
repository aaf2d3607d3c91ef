"""``brokerctl reconcile`` and ``brokerctl jobs retry`` as an operator runs them."""

from __future__ import annotations

import asyncio
import json

from tests.harness.api import issue, wait_job
from tests.harness.pki import mounted_pki, pki_role
from tests.harness.proxy import FaultProxy
from tests.integration.test_cli import ctl_env, run


async def test_reconcile_reports_orphans_exits_7_and_revokes_them_when_asked(
        make_broker, vault, http):
    with mounted_pki(vault, {"probe": pki_role()}) as pki:
        roles = {"probe-cert": {"engine": "pki", "mount": pki.path, "vault_role": "probe",
                                "params": {"common_name": "{workload}.workload.internal"}}}
        b = await make_broker(instance_policies=(pki.policy,), overrides={
            "roles": roles, "policy": {"rules": [{"name": "all", "allow": ["probe-cert"]}]},
            "reconcile": {"clock_skew_s": 0}})
        env = ctl_env(b.url)
        code, out, err = await run("broker.cli.ctl", "reconcile", env=env)
        assert code == 0, (out, err)
        assert "orphans            0 found, 0 revoked" in out

        status, body = vault.call("POST", f"{pki.path}/issue/probe",
                                  {"common_name": "stray.workload.internal"})
        assert status == 200
        stray = body["lease_id"]
        await asyncio.sleep(5.5)  # older than the tests' issuing bound
        code, out, _ = await run("broker.cli.ctl", "reconcile", env=env)
        assert code == 7
        assert f"  orphan  {stray}" in out
        assert "revoke the orphans with: brokerctl reconcile --revoke-orphans" in out
        assert vault.lease_exists(stray)

        code, out, _ = await run("broker.cli.ctl", "-o", "json", "reconcile",
                                 "--revoke-orphans", env=env)
        assert code == 0
        report = json.loads(out)
        assert (report["orphans"], report["orphans_revoked"]) == (1, 1)
        assert not vault.lease_exists(stray)


async def test_a_failed_job_is_listed_and_retried(make_broker, bao, http):
    proxy = FaultProxy("127.0.0.1", bao.port)
    await proxy.start()
    try:
        b = await make_broker(vault_addr=proxy.url,
                              overrides={"revocation": {"tick_s": 0.2, "max_attempts": 1,
                                                        "backoff_base_s": 0.2,
                                                        "claim_timeout_s": 5,
                                                        "issuing_timeout_s": 5}})
        status, _ = await issue(http, b, "i-fails", "dev-db")
        assert status == 201
        env = ctl_env(b.url)
        proxy.cut()
        code, out, err = await run("broker.cli.ctl", "revoke", "--instance", "i-fails",
                                   "--wait", "--timeout", "20", env=env)
        assert code == 1 and "vault_unavailable" in err, (out, err)

        code, out, _ = await run("broker.cli.ctl", "-o", "json", "jobs", "list", "--state",
                                 "failed", env=env)
        [job] = json.loads(out)["jobs"]
        assert (job["instance_id"], job["last_error"]) == ("i-fails", "vault_unavailable")

        code, out, err = await run("broker.cli.ctl", "jobs", "retry", "j-" + "0" * 32, env=env)
        assert code == 3 and "job_not_found" in err

        proxy.restore()
        code, out, err = await run("broker.cli.ctl", "jobs", "retry", job["job_id"], env=env)
        assert code == 0, err
        assert out.strip() == f"job {job['job_id']} of instance i-fails is pending again"
        shown = await wait_job(http, b, "i-fails")
        assert shown["job"]["state"] == "done"
        assert [x["state"] for x in shown["leases"]] == ["revoked"]

        code, out, err = await run("broker.cli.ctl", "jobs", "retry", job["job_id"], env=env)
        assert code == 1 and "job_not_failed" in err
    finally:
        await proxy.stop()
