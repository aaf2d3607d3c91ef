"""POST /v1/events/terminate against a real broker, as an attacker and as a pipeline."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from broker.events.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from tests.harness.api import issue, wait_job
from tests.harness.proxy import FaultProxy

SECRET = "w" * 40
NEXT_SECRET = "n" * 40


def _signed(body: Any, *, secret: str = SECRET, ts: int | None = None) -> tuple[bytes, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    stamp = str(int(time.time()) if ts is None else ts)
    return raw, {TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: sign(secret.encode(), stamp, raw),
                 "Content-Type": "application/json"}


async def _post(http, b, raw: bytes, headers: dict) -> tuple[int, Any]:
    async with http.post(f"{b.url}/v1/events/terminate", data=raw, headers=headers) as resp:
        return resp.status, await resp.json()


@pytest.fixture
async def b(make_broker):
    return await make_broker(overrides={"events": {"webhook": {"secrets": [SECRET, NEXT_SECRET],
                                                               "window_s": 60}}})


async def test_a_signed_event_terminates_and_revokes(b, http, vault):
    status, cred = await issue(http, b, "i-hook", "dev-db")
    assert status == 201
    raw, headers = _signed({"instance_ids": ["i-hook", "i-never-seen"], "reason": "scale-in"})
    status, body = await _post(http, b, raw, headers)
    assert status == 202, body
    assert [r["instance_id"] for r in body["results"]] == ["i-hook", "i-never-seen"]
    assert all(r["job"]["requested_by"] == "events:webhook" for r in body["results"])
    assert all(r["job"]["reason"] == "scale-in" for r in body["results"])  # kept, not dropped
    shown = await wait_job(http, b, "i-hook")
    assert shown["state"] == "terminated"
    assert [x["state"] for x in shown["leases"]] == ["revoked"]
    assert not vault.lease_exists(shown["leases"][0]["vault_lease_id"])
    # Tombstoned: the unknown instance can never draw a credential now.
    status, refused = await issue(http, b, "i-never-seen", "dev-cert")
    assert (status, refused["error"]["code"]) == (409, "instance_terminated")


async def test_the_next_secret_is_accepted_during_rotation(b, http):
    raw, headers = _signed({"instance_ids": ["i-rotate"]}, secret=NEXT_SECRET)
    status, _ = await _post(http, b, raw, headers)
    assert status == 202


async def test_a_replay_is_refused_even_inside_the_window(b, http):
    raw, headers = _signed({"instance_ids": ["i-replay"]})
    assert (await _post(http, b, raw, headers))[0] == 202
    status, body = await _post(http, b, raw, headers)
    assert (status, body["error"]["code"]) == (401, "event_replayed")


@pytest.mark.parametrize("attack", [
    "unsigned", "wrong-secret", "tampered-body", "stale", "future", "re-dated", "bad-header",
], ids=str)
async def test_forged_requests_change_nothing(b, http, attack):
    status, _ = await issue(http, b, "i-target", "dev-cert")
    assert status == 201
    before = b.store_snapshot()
    raw, headers = _signed({"instance_ids": ["i-target"]})
    now = int(time.time())
    if attack == "unsigned":
        headers = {"Content-Type": "application/json"}
    elif attack == "wrong-secret":
        raw, headers = _signed({"instance_ids": ["i-target"]}, secret="x" * 40)
    elif attack == "tampered-body":
        raw = json.dumps({"instance_ids": ["i-target", "i-other"]}).encode()
    elif attack == "stale":
        raw, headers = _signed({"instance_ids": ["i-target"]}, ts=now - 120)
    elif attack == "future":
        raw, headers = _signed({"instance_ids": ["i-target"]}, ts=now + 120)
    elif attack == "re-dated":
        headers[TIMESTAMP_HEADER] = str(now + 5)
    elif attack == "bad-header":
        headers[SIGNATURE_HEADER] = "sha256=" + "z" * 64
    status, body = await _post(http, b, raw, headers)
    assert status == 401
    assert body["error"]["code"].startswith("event_")
    assert SECRET not in json.dumps(body)
    assert b.store_snapshot() == before
    async with http.get(f"{b.url}/v1/instances/i-target", headers=b.admin()) as resp:
        assert (await resp.json())["state"] == "active"


async def test_a_signed_but_malformed_body_is_refused_and_changes_nothing(b, http):
    before = b.store_snapshot()
    for payload, code in (({"instance_ids": ["../x"]}, "invalid_instance_id"),
                          ({"instance_ids": []}, "invalid_instance_ids"),
                          ({"instance_ids": ["i-1"], "issuer": "nobody"}, "invalid_issuer"),
                          (b"{not json", "malformed_json")):
        raw, headers = _signed(payload)
        status, body = await _post(http, b, raw, headers)
        assert (status, body["error"]["code"]) == (400, code)
    assert b.store_snapshot() == before


async def test_without_a_webhook_section_the_endpoint_does_not_exist(make_broker, http):
    plain = await make_broker()
    raw, headers = _signed({"instance_ids": ["i-1"]})
    status, body = await _post(http, plain, raw, headers)
    assert (status, body["error"]["code"]) == (404, "not_found")


async def test_store_down_means_503_and_the_same_request_can_be_sent_again(make_broker, pg,
                                                                           http):
    proxy = FaultProxy(pg.host, pg.port)
    await proxy.start()
    name = await asyncio.to_thread(pg.create_database)
    try:
        b = await make_broker(store_url=f"postgresql://postgres@127.0.0.1:{proxy.port}/{name}",
                              overrides={"events": {"webhook": {"secrets": [SECRET]}}})
        raw, headers = _signed({"instance_ids": ["i-retry"]})
        proxy.cut()
        status, body = await _post(http, b, raw, headers)
        assert (status, body["error"]["code"]) == (503, "store_unavailable")
        proxy.restore()
        status, body = await _post(http, b, raw, headers)  # not taken for a replay
        assert status == 202, body
        assert [r["instance_id"] for r in body["results"]] == ["i-retry"]
    finally:
        await proxy.stop()
        await asyncio.to_thread(pg.drop_database, name)
