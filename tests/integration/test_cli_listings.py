"""An operator's listings during an incident, as brokerctl shows them from a real broker
(OpenBao, PostgreSQL): a lease explosion counted, instances and jobs listed a page at a
time with a notice wherever a list is cut, a lease shown with Vault's live view, and
``policy explain`` refusing (exit 10) for a terminated instance."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from tests.conftest import ADMIN_TOKEN


async def ctl(b, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli.ctl", *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "BROKER_URL": b.url, "BROKER_ADMIN_TOKEN": ADMIN_TOKEN})
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def issue(http, b, instance: str, workload: str, role: str = "dev-cert") -> dict:
    async with http.post(f"{b.url}/v1/credentials", json={"role": role},
                         headers={"Authorization": f"Bearer {b.token(instance, workload)}"}) as r:
        assert r.status == 201, await r.text()
        return await r.json()


async def get(http, b, path: str) -> tuple[int, dict]:
    async with http.get(f"{b.url}{path}", headers=b.admin()) as resp:
        return resp.status, await resp.json()


async def test_a_lease_explosion_counted_listed_and_shown(broker, http):
    b = broker
    made = [await issue(http, b, "i-boom", "billing") for _ in range(4)]
    made += [await issue(http, b, f"i-pay-{n}", "payments") for n in range(2)]

    status, body = await get(http, b, "/v1/admin/leases/count?group_by=workload")
    assert status == 200
    assert body == {"group_by": "workload", "states": ["active", "issuing", "revoking"],
                    "groups": [{"key": "billing", "count": 4}, {"key": "payments", "count": 2}],
                    "total": 6, "group_count": 2, "others": 0}
    code, out, err = await ctl(b, "leases", "count", "--group-by", "workload", "--top", "1")
    assert (code, out.split(), err) == (0, ["GROUP", "COUNT", "billing", "4"], (
        "brokerctl: 1 of 2 groups shown (2 leases in the others); more results: pass --top N\n"))
    code, out, _ = await ctl(b, "leases", "count", "--group-by", "issuer", "-o", "json")
    assert json.loads(out)["groups"] == [{"key": "dev", "count": 6}]
    code, out, _ = await ctl(b, "leases", "count", "--group-by", "engine", "--state", "active")
    assert out.split() == ["GROUP", "COUNT", "x509_certificate", "6"]

    # A list cut at --limit says so, and --after continues it exactly.
    code, out, err = await ctl(b, "-o", "json", "leases", "list", "--limit", "4")
    first = json.loads(out)
    assert code == 0 and len(first["leases"]) == 4 and first["next"] == \
        first["leases"][-1]["lease_id"]
    code, out, err = await ctl(b, "leases", "list", "--limit", "4")
    assert err == f"brokerctl: 4 leases shown; more results: pass --limit N or --after " \
                  f"{first['next']}\n"
    code, out, err = await ctl(b, "leases", "list", "-o", "jsonl", "--after", first["next"])
    rest = [json.loads(line) for line in out.splitlines()]
    assert (code, err) == (0, "")
    assert sorted(x["lease_id"] for x in first["leases"] + rest) == \
        sorted(c["lease_id"] for c in made)

    code, out, _ = await ctl(b, "-o", "json", "instances", "list", "--workload", "billing",
                             "--since", "1h")
    [boom] = json.loads(out)["instances"]
    assert (boom["instance_id"], boom["live_leases"], boom["leases"]) == (
        "i-boom", 4, {"active": 4})
    code, out, err = await ctl(b, "instances", "list", "--limit", "1")
    assert out.splitlines()[0].split() == ["INSTANCE_ID", "STATE", "WORKLOAD", "ISSUER_NAME",
                                           "LIVE_LEASES", "CREATED_AT", "TERMINATED_AT"]
    assert "1 instances shown; more results: pass --limit N or --after " in err

    lease = made[0]["lease_id"]
    code, out, _ = await ctl(b, "-o", "json", "leases", "show", lease, "--vault")
    shown = json.loads(out)
    assert (shown["lease_id"], shown["state"]) == (lease, "active")
    assert set(shown["vault"]) == {"lease_id", "issue_time", "expire_time", "ttl", "renewable"}
    assert shown["vault"]["lease_id"] == shown["vault_lease_id"]
    assert 0 < shown["vault"]["ttl"] <= 3600
    code, out, _ = await ctl(b, "leases", "show", lease)
    assert "vault" not in out.split() and f"lease_id        {lease}" in out

    code, out, _ = await ctl(b, "revoke", "--instance", "i-boom", "--wait")
    assert code == 0, out
    code, out, _ = await ctl(b, "leases", "show", lease, "--vault")
    assert (code, out.splitlines()[-1]) == (0, (
        "vault           Vault does not know this lease (gone, or lost if the store still "
        "counts it live) (lease_unknown)"))
    code, _, err = await ctl(b, "leases", "show", "l-" + "0" * 32)
    assert code == 3 and "lease_not_found" in err


async def test_jobs_listed_a_page_at_a_time_with_a_notice(broker, http):
    b = broker
    for n in range(5):
        async with http.post(f"{b.url}/v1/instances/i-job-{n}/terminate",
                             headers=b.admin()) as resp:
            assert resp.status == 202
    status, page = await get(http, b, "/v1/admin/jobs?limit=2")
    assert status == 200 and len(page["jobs"]) == 2 and page["next"]
    code, out, err = await ctl(b, "jobs", "list", "--limit", "2")
    assert (code, len(out.splitlines())) == (0, 3)
    assert err == f"brokerctl: 2 jobs shown; more results: pass --limit N or --after " \
                  f"{page['next']}\n"
    seen, after = [], None
    for _ in range(5):
        code, out, _ = await ctl(b, "-o", "json", "jobs", "list", "--limit", "2",
                                 *(["--after", after] if after else []))
        answer = json.loads(out)
        seen += [j["instance_id"] for j in answer["jobs"]]
        after = answer["next"]
        if not after:
            break
    assert sorted(seen) == [f"i-job-{n}" for n in range(5)] and len(set(seen)) == 5
    code, out, _ = await ctl(b, "-o", "json", "jobs", "list", "--instance", "i-job-3")
    assert [j["instance_id"] for j in json.loads(out)["jobs"]] == ["i-job-3"]
    code, out, _ = await ctl(b, "-o", "json", "jobs", "list", "--since",
                             "2999-01-01T00:00:00Z")
    assert json.loads(out) == {"jobs": [], "next": None}


async def test_explain_refuses_a_terminated_instance_and_exits_10(broker, http, tmp_path):
    b = broker
    token_file = tmp_path / "token"
    token_file.write_text(b.token("i-explain-dead", "payments") + "\n")
    code, out, _ = await ctl(b, "policy", "explain", "--token", str(token_file), "--role",
                             "dev-cert")
    assert code == 0 and out.splitlines()[0] == "verdict   GRANTED"
    assert "instance  never seen" in out

    await issue(http, b, "i-explain-dead", "payments")
    code, out, _ = await ctl(b, "revoke", "--instance", "i-explain-dead", "--wait")
    assert code == 0, out
    code, out, err = await ctl(b, "policy", "explain", "--token", str(token_file), "--role",
                               "dev-cert")
    lines = out.splitlines()
    assert code == 10, (out, err)
    assert lines[0] == "verdict   REFUSED"
    assert lines[1].startswith(
        "refused   instance i-explain-dead is terminated: the broker issues and renews "
        "nothing for it (instance_terminated, since 20")
    assert lines[1].endswith(", by operator:admin)")
    assert "instance  terminated" in lines
    code, out, _ = await ctl(b, "policy", "explain", "--token", str(token_file), "--role",
                             "dev-cert", "-o", "json")
    answer = json.loads(out)
    assert code == 10 and answer["verdict"] == "refused"
    assert [r["code"] for r in answer["refusals"]] == ["instance_terminated"]
    assert answer["decision"]["allowed"] is True  # the policy alone would allow it

    # The broker agrees: the exchange is refused the same way.
    async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-cert"},
                         headers={"Authorization": f"Bearer {b.token('i-explain-dead')}"}) as r:
        assert (r.status, (await r.json())["error"]["code"]) == (409, "instance_terminated")

    code, out, _ = await ctl(b, "policy", "explain", "--token", "-", "--role", "dev-cert",
                             stdin=b"not-a-token")
    lines = out.splitlines()
    assert (code, lines[0], lines[1].endswith("(token_malformed)"), len(lines)) == (
        10, "verdict   REFUSED", True, 3), out
    assert lines[2].startswith("token     REFUSED by no configured issuer: ")


async def test_every_admin_get_refuses_unknown_query_parameters(broker, http):
    lease = "l-" + "0" * 32
    for path, takes in [
        ("/v1/admin/leases", "after, instance, limit, role, state, workload"),
        ("/v1/admin/leases/count", "group_by, state, top"),
        (f"/v1/admin/leases/{lease}", "vault"),
        ("/v1/admin/instances", "after, issuer, limit, since, state, workload"),
        ("/v1/instances/i-x", "none"),
        ("/v1/admin/jobs", "after, instance, limit, since, state"),
    ]:
        status, body = await get(http, broker, f"{path}?sate=done")
        assert (status, body["error"]) == (400, {
            "code": "unknown_query",
            "message": f"unknown query parameter 'sate'; this endpoint takes: {takes}"}), path
    status, body = await get(http, broker, "/v1/admin/jobs?state=done&state=failed")
    assert (status, body["error"]["code"]) == (400, "invalid_query")
