"""Reading the audit trail out: the events endpoint's selectors and cursor, its refusals,
and brokerctl audit list (with its more-results notice), tail (and --follow), export as
JSON lines and OCSF (and --follow), against a running broker."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from tests.conftest import ADMIN_TOKEN
from tests.harness.api import issue, terminate
from tests.harness.wait import eventually
from tests.unit.audit.test_ocsf import check_shape


async def record(b, n: int, action: str = "test.event", **detail) -> None:
    for i in range(n):
        await b.broker.components.ledgers.reconcile.record_audit(
            "reconciler", action, n=i, **detail)


async def get(http, b, **query):
    async with http.get(f"{b.url}/v1/admin/audit/events", params=query,
                        headers=b.admin()) as resp:
        return resp.status, await resp.json()


async def ctl(b, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli.ctl", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "BROKER_URL": b.url, "BROKER_ADMIN_TOKEN": ADMIN_TOKEN})
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_events_by_selector_with_a_cursor(make_broker, http, store):
    b = await make_broker(store=store)
    status, issued = await issue(http, b, "i-aud-1", "dev-cert", workload="payments")
    assert status == 201
    status, _ = await issue(http, b, "i-aud-2", "dev-cert", workload="billing")
    assert status == 201
    await terminate(http, b, "i-aud-1")
    await terminate(http, b, "i-aud-2")
    await eventually(lambda: _terminated(http, b, "i-aud-2"), "i-aud-2 terminated")
    await record(b, 5)

    status, body = await get(http, b, limit="1000")
    assert status == 200 and body["next"] is None
    seqs = [e["seq"] for e in body["events"]]
    assert seqs == sorted(seqs) and seqs == list(range(1, len(seqs) + 1))
    first = body["events"][0]
    assert set(first) == {"seq", "at", "actor", "action", "instance_id", "lease_id", "outcome",
                          "reason", "detail", "prev_hash", "hash"}

    status, one = await get(http, b, instance="i-aud-1")
    assert {e["instance_id"] for e in one["events"]} == {"i-aud-1"}
    assert "instance.terminate_requested" in {e["action"] for e in one["events"]}
    # a lease: every event naming it (issued, then revoked with its instance), no other
    lease = issued["lease_id"]
    status, of_lease = await get(http, b, lease=lease)
    assert status == 200 and {e["lease_id"] for e in of_lease["events"]} == {lease}
    assert "lease.issued" in {e["action"] for e in of_lease["events"]}
    status, none = await get(http, b, lease="l-" + "0" * 32)
    assert status == 200 and none["events"] == []
    code, out, _ = await ctl(b, "audit", "list", "--lease", lease, "-o", "json")
    assert code == 0 and [e["seq"] for e in json.loads(out)] == [
        e["seq"] for e in of_lease["events"]]
    code, out, _ = await ctl(b, "audit", "tail", "--lease", lease, "-n", "1", "-o", "json")
    assert code == 0 and [e["seq"] for e in json.loads(out)] == [of_lease["events"][-1]["seq"]]
    status, billing = await get(http, b, workload="billing")
    assert {e["instance_id"] for e in billing["events"]} == {"i-aud-2"}
    status, by_action = await get(http, b, action="test.event", actor="reconciler")
    assert len(by_action["events"]) == 5
    # An actor's kind selects all of its kind: every operator, every revocation worker.
    status, by_kind = await get(http, b, actor="operator")
    assert {e["actor"] for e in by_kind["events"]} == {"operator:admin"}
    status, revocation = await get(http, b, actor="revocation")
    actors = {e["actor"].split(":")[0] for e in revocation["events"]}
    assert actors == {"revocation"} and "instance.terminated" in {
        e["action"] for e in revocation["events"]}
    status, literal = await get(http, b, actor="operator%")
    assert literal["events"] == []  # a wildcard is a character, not a pattern
    status, since = await get(http, b, since=first["at"])
    assert len(since["events"]) == len(seqs)

    # pages: the cursor walks them all exactly once
    walked, after = [], 0
    for _ in range(len(seqs)):
        status, page = await get(http, b, after=str(after), limit="2")
        walked += [e["seq"] for e in page["events"]]
        if page["next"] is None:
            break
        after = page["next"]
    assert walked == seqs
    status, tail = await get(http, b, newest="true", limit="3")
    assert [e["seq"] for e in tail["events"]] == seqs[-3:] and tail["next"] is None


async def _terminated(http, b, instance):
    async with http.get(f"{b.url}/v1/instances/{instance}", headers=b.admin()) as resp:
        return (await resp.json())["state"] == "terminated"


@pytest.mark.parametrize("query,code", [
    ({"limit": "0"}, "invalid_query"), ({"limit": "1001"}, "invalid_query"),
    ({"limit": "x"}, "invalid_query"), ({"after": "-1"}, "invalid_query"),
    ({"since": "yesterday"}, "invalid_query"), ({"newest": "yes"}, "invalid_query"),
    ({"lease": "l" * 1000}, "invalid_query"), ({"lease": "l-\x00"}, "invalid_query"),
    ({"colour": "blue"}, "unknown_query"),
], ids=["limit-0", "limit-1001", "limit-nan", "after-negative", "since-words",
        "newest-not-bool", "lease-too-long", "lease-nul", "unknown"])
async def test_bad_queries_are_refused(broker, http, query, code):
    """As every admin listing refuses them (``broker.api.queries``); a ``since`` without a
    zone is UTC there, as in the other listings."""
    status, body = await get(http, broker, **query)
    assert status == 400 and body["error"]["code"] == code


async def test_reading_needs_an_operator(broker, http):
    async with http.get(f"{broker.url}/v1/admin/audit/events") as resp:
        assert resp.status == 401


async def test_brokerctl_audit_list_tail_and_export(broker):
    await record(broker, 12)
    code, out, err = await ctl(broker, "audit", "list", "--action", "test.event", "--limit", "5")
    assert code == 0
    header, *rows = out.strip().splitlines()
    assert header.split()[:4] == ["SEQ", "AT", "ACTOR", "ACTION"] and len(rows) == 5
    assert "more match: continue with --after 5" in err
    code, out, err = await ctl(broker, "audit", "list", "--actor", "reconciler", "-o", "jsonl")
    assert code == 0 and err == ""
    assert [json.loads(x)["seq"]
            for x in out.splitlines()] == list(range(1, 13))

    code, out, _ = await ctl(broker, "audit", "tail", "-n", "3", "-o", "json")
    assert [e["seq"] for e in json.loads(out)] == [10, 11, 12]

    code, out, _ = await ctl(broker, "audit", "export", "--since", "4")
    lines = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and [e["seq"] for e in lines] == list(range(4, 13))
    assert all({"hash", "prev_hash", "detail"} <= set(e) for e in lines)
    code, out, _ = await ctl(broker, "audit", "export", "--format", "ocsf")
    records = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and len(records) == 12
    for r in records:
        check_shape(r)
    assert records[0]["metadata"]["uid"] == "1"


async def test_follow_prints_new_events_until_the_timeout(broker):
    await record(broker, 2)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli.ctl", "audit", "export", "--follow", "--interval",
        "0.2", "--timeout", "60", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "BROKER_URL": broker.url, "BROKER_ADMIN_TOKEN": ADMIN_TOKEN})
    seen: list[dict] = []

    async def read_until(seq: int) -> bool:
        while not seen or seen[-1]["seq"] < seq:
            line = await proc.stdout.readline()
            if not line:
                raise AssertionError((await proc.stderr.read()).decode())
            seen.append(json.loads(line))
        return True

    try:
        assert await asyncio.wait_for(read_until(2), 30)
        await record(broker, 3, action="test.later")
        assert await asyncio.wait_for(read_until(5), 30)
        assert [e["action"] for e in seen[2:]] == ["test.later"] * 3
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()

    # tail --follow stops by itself at --timeout (exit 0)
    code, out, _ = await ctl(broker, "audit", "tail", "--follow", "-o", "jsonl", "-n", "1",
                             "--interval", "0.2", "--timeout", "1")
    assert code == 0 and [json.loads(x)["seq"] for x in out.splitlines()] == [5]
