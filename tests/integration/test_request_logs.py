"""Logs a responder can use, from a real broker: one info line per credential issued,
lease renewed or released, instance ending itself and request refused, each naming the
issuer, instance, workload, role, lease, error code and the client's address, and not one
line holding a token, a password or a private key; a healthy reconcile pass says nothing
above debug, one that finds something says so at info."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.logs import JsonFormatter
from tests.harness.api import bearer
from tests.harness.pki import Mount, mounted_pki, pki_role
from tests.harness.vault import VaultProbe

OUTCOMES = ("credential issued", "lease renewed", "lease released",
            "instance terminating itself", "request refused")


def _unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def _lines(caplog: pytest.LogCaptureFixture, msg: str) -> list[dict[str, Any]]:
    """The outcome lines ``msg`` as they are written (JSON, masked), parsed back."""
    fmt = JsonFormatter()
    return [json.loads(fmt.format(r)) for r in caplog.records if r.getMessage() == msg]


def _one(lines: list[dict[str, Any]], **where: Any) -> dict[str, Any]:
    found = [line for line in lines if all(line.get(k) == v for k, v in where.items())]
    assert len(found) == 1, (where, lines)
    return found[0]


async def _post(http: Any, url: str, token: str, body: dict[str, Any] | None = None
                ) -> tuple[int, Any]:
    async with http.post(url, headers=bearer(token), json=body or {}) as resp:
        return resp.status, await resp.json()


async def test_one_line_per_outcome_with_who_what_and_from_where_and_no_secret(
        make_broker, http, vault_setup, caplog):
    if not vault_setup.database_configured:
        pytest.skip("needs the database engine for a password and a renewable lease")
    caplog.set_level(logging.DEBUG)
    # A role Vault refuses (no such Vault role, no policy for it): a refusal that comes
    # after the lease row is written, so it can name the lease.
    b = await make_broker(extra_roles={"logs-refused": {
        "engine": "pki", "mount": "pki", "vault_role": _unique("no-such-role"),
        "default_ttl": "10m", "max_ttl": "1h",
        "params": {"common_name": "{workload}.workload.internal"}}})
    instance, other = _unique("i-logs"), _unique("i-logs-other")
    token = b.token(instance)
    base = f"{b.url}/v1"

    status, db = await _post(http, f"{base}/credentials", token, {"role": "dev-db"})
    assert status == 201, db
    status, cert = await _post(http, f"{base}/credentials", token, {"role": "dev-cert"})
    assert status == 201, cert
    status, renewed = await _post(http, f"{base}/leases/{db['lease_id']}/renew", token,
                                  {"ttl": "10m"})
    assert status == 200, renewed
    async with http.delete(f"{base}/leases/{db['lease_id']}", headers=bearer(token)) as resp:
        assert resp.status == 204
    # Refusals: a token that fails its signature, a workload policy refuses, someone
    # else's lease, a lock, Vault.
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    status, body = await _post(http, f"{base}/credentials", forged, {"role": "dev-db"})
    assert status == 401, body
    status, body = await _post(http, f"{base}/credentials",
                               b.token(other, workload="NOT_A_WORKLOAD"), {"role": "dev-db"})
    assert (status, body["error"]["code"]) == (403, "role_not_permitted"), body
    status, body = await _post(http, f"{base}/leases/{cert['lease_id']}/renew", b.token(other))
    assert (status, body["error"]["code"]) == (404, "lease_not_found"), body
    locked_workload = _unique("logs-locked")
    async with http.post(f"{base}/admin/locks", headers=b.admin(),
                         json={"kind": "workload", "value": locked_workload,
                               "reason": "request logs test"}) as resp:
        assert resp.status == 201, await resp.text()
        lock_id = (await resp.json())["lock"]["lock_id"]
    status, body = await _post(http, f"{base}/credentials",
                               b.token(other, workload=locked_workload), {"role": "dev-cert"})
    assert (status, body["error"]["code"]) == (403, "locked"), body
    status, body = await _post(http, f"{base}/credentials", b.token(other),
                               {"role": "logs-refused"})
    assert status == 502, body
    status, ended = await _post(http, f"{base}/instances/self/terminate", token)
    assert status == 202, ended

    me = {"issuer": "dev", "instance_id": instance, "workload": "payments", "client": "127.0.0.1"}
    issued = _lines(caplog, "credential issued")
    for cred in (db, cert):
        line = _one(issued, lease_id=cred["lease_id"])
        assert line | me == line and line["level"] == "info"
        assert (line["role"], line["kind"], line["expires_at"]) == (
            cred["role"], cred["kind"], cred["expires_at"])
    line = _one(_lines(caplog, "lease renewed"), lease_id=db["lease_id"])
    assert line | me == line and line["level"] == "info"
    assert (line["role"], line["expires_at"]) == ("dev-db", renewed["expires_at"])
    line = _one(_lines(caplog, "lease released"), lease_id=db["lease_id"])
    assert line | me == line and line["level"] == "info" and line["role"] == "dev-db"
    assert line["state"] == "released"
    line = _one(_lines(caplog, "instance terminating itself"), instance_id=instance)
    assert line | me == line and line["job_id"] == ended["job"]["job_id"]

    refused = _lines(caplog, "request refused")
    assert {line["level"] for line in refused if line["status"] < 500} == {"info"}
    upstream = _one(refused, status=502)  # Vault failed, not the caller: warning
    assert upstream["level"] == "warning" and upstream["role"] == "logs-refused"
    assert upstream["lease_id"].startswith("l-") and upstream["instance_id"] == other
    bad_token = _one(refused, status=401)
    assert bad_token["route"] == "/v1/credentials" and bad_token["client"] == "127.0.0.1"
    assert bad_token["code"] and "instance_id" not in bad_token  # nobody verified
    policy = _one(refused, code="role_not_permitted")
    assert policy | {"instance_id": other, "workload": "NOT_A_WORKLOAD", "role": "dev-db",
                     "issuer": "dev", "status": 403, "client": "127.0.0.1"} == policy
    assert policy["reason"]  # why, for the responder; the caller is not told
    not_mine = _one(refused, code="lease_not_found")
    assert not_mine | {"instance_id": other, "lease_id": cert["lease_id"], "status": 404,
                       "route": "/v1/leases/{lease_id}/renew"} == not_mine
    lock = _one(refused, code="locked")
    assert lock | {"lock_id": lock_id, "workload": locked_workload, "role": "dev-cert"} == lock
    # The deeper duplicates are gone: one line per refusal.
    assert not [r for r in caplog.records if r.getMessage() in ("role refused",
                                                                  "refused by a lock")]

    fmt = JsonFormatter()
    text = "\n".join(fmt.format(r) for r in caplog.records)
    never = (token, token.split(".")[2], forged, db["data"]["password"],
             cert["data"]["private_key"], b.admin()["Authorization"].split()[1],
             b.settings.vault.auth.token.get_secret_value())
    for secret in never:
        assert secret not in text


# -- reconcile ---------------------------------------------------------------------------


class AheadClock:
    """The real time plus an offset a test sets: how a test ages what Vault stamped."""

    def __init__(self) -> None:
        self.ahead = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.ahead


@pytest.fixture
def pki(vault: VaultProbe) -> Iterator[Mount]:
    with mounted_pki(vault, {"probe": pki_role(ttl="10m")}) as mount:
        yield mount


@pytest.fixture
async def clock() -> AheadClock:
    return AheadClock()


@pytest.fixture
async def quiet_broker(make_broker, pki: Mount, clock: AheadClock):
    """A broker whose only role issues from the test's own PKI mount, so that whatever a
    pass finds under its paths belongs to this test; no reconcile tick of its own."""
    roles = {"probe-cert": {"engine": "pki", "mount": pki.path, "vault_role": "probe",
                            "default_ttl": "10m", "max_ttl": "1h",
                            "params": {"common_name": "{workload}.workload.internal"}}}
    return await make_broker(
        clock=clock,
        instance_policies=(pki.policy,),
        overrides={"roles": roles, "policy": {"rules": [{"name": "all", "allow": ["probe-cert"]}]},
                   "reconcile": {"tick_s": 3600}},
    )


async def test_a_healthy_reconcile_pass_logs_nothing_above_debug_and_a_finding_logs_info(
        quiet_broker, http, vault, pki, clock, caplog):
    b = quiet_broker
    status, cred = await _post(http, f"{b.url}/v1/credentials", b.token(_unique("i-quiet")),
                               {"role": "probe-cert"})
    assert status == 201, cred
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    report = await b.broker.components.reconcile()
    assert report.found_nothing(), report
    ours = [r for r in caplog.records if r.name.startswith("broker.revocation")]
    assert [r.levelname for r in ours if r.getMessage() == "reconcile pass"] == ["DEBUG"]
    assert not [(r.name, r.getMessage()) for r in ours if r.levelno > logging.DEBUG]

    # A lease under the broker's path that it never recorded, old enough to be an orphan
    # (the broker's clock runs ahead of Vault's): the pass says so at info.
    status, body = vault.call("POST", f"{pki.path}/issue/probe",
                              {"common_name": "stray.workload.internal", "ttl": "10m"})
    assert status == 200, body
    clock.ahead = timedelta(minutes=5)
    caplog.clear()
    report = await b.broker.components.reconcile()
    assert report.orphans == 1, report
    [line] = [r for r in caplog.records if r.getMessage() == "reconcile pass"]
    assert line.levelname == "INFO" and line.orphans == 1
