"""Issuance racing termination: whatever interleaving happens, once the job is done
nothing the instance was given is alive in Vault or PostgreSQL, and every row is final."""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.harness.wait import eventually


@pytest.mark.parametrize("store", ["postgresql", "sqlite"])
async def test_terminate_in_the_middle_of_concurrent_issuance(make_broker, http, pg, vault,
                                                              store):
    b = await make_broker(store)
    token = {"Authorization": f"Bearer {b.token('i-race')}"}
    rng = random.Random(7)
    five_issued = asyncio.Event()
    count = 0

    terminated = asyncio.Event()

    async def issue(k: int):
        nonlocal count
        if k >= 35:
            # The last five arrive after the terminate was answered: some are refused
            # however fast this machine served the others (all of them, when it is fast).
            await terminated.wait()
        elif k >= 30:
            await five_issued.wait()  # these five race the terminate
        await asyncio.sleep(rng.random() * 0.6)
        role = "dev-db" if k % 2 else "dev-cert"
        async with http.post(f"{b.url}/v1/credentials", json={"role": role},
                             headers=token) as resp:
            answer = resp.status, await resp.json()
        if answer[0] == 201:
            count += 1
            if count >= 5:
                five_issued.set()
        return answer

    async def terminate():
        # Land while requests are still arriving and in flight.
        await asyncio.wait_for(five_issued.wait(), 30)
        async with http.post(f"{b.url}/v1/instances/i-race/terminate",
                             headers=b.admin()) as resp:
            assert resp.status == 202
        terminated.set()

    results = await asyncio.gather(*(issue(k) for k in range(40)), terminate())
    answers = results[:40]
    assert {status for status, _ in answers} <= {201, 409}, answers
    issued = [body for status, body in answers if status == 201]
    refused = [body for status, body in answers if status == 409]
    assert all(x["error"]["code"] == "instance_terminated" for x in refused)
    assert issued and refused, ("the terminate should land in the middle", answers)

    def job_done() -> bool:
        jobs = b.rows("revocation_jobs")
        return bool(jobs) and jobs[0]["state"] == "done"

    await eventually(job_done, "the revocation job done")

    leases = b.rows("leases")
    assert {x["state"] for x in leases} <= {"revoked", "failed", "abandoned"}
    for lease in leases:
        if lease["vault_lease_id"]:
            assert not vault.lease_exists(lease["vault_lease_id"])
    for cred in issued:
        if cred["kind"] == "database_login":
            assert not pg.role_exists(cred["data"]["username"])
    for tok in b.rows("instance_tokens"):
        assert not vault.accessor_alive(tok["accessor"])
    by_id = {x["lease_id"]: x for x in leases}
    assert all(by_id[c["lease_id"]]["state"] == "revoked" for c in issued)
