"""Marking a lost lease resolved is an operator's act of scope revoke, recorded as theirs:
a read operator is refused (403, audited as admin.refused) and the lease stays lost; an
unknown or malformed lease id is 404 ``lease_not_found``; a lease in any other state is 409
``lease_not_lost``; a missing or blank reason, or a bad incident, is 400. Every refusal
leaves the lease and the audit's lease events as they were."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from broker.dev.issuer import DevIssuer
from tests.conftest import ADMIN_TOKEN
from tests.harness.api import bearer, issue
from tests.integration.test_lost_leases import _sql
from tests.integration.test_operators_locks import (  # noqa: F401 — the fixture
    READER,
    REVOKER,
    admin_section,
    events,
    ops_issuer,
)


@pytest.fixture
async def guarded(make_broker, ops_issuer: DevIssuer):  # noqa: F811
    return await make_broker(store="sqlite", overrides={"admin": admin_section(ops_issuer)})


async def _issued(http: Any, b: Any, instance: str) -> str:
    status, cred = await issue(http, b, instance, "dev-cert")
    assert status == 201, cred
    return cred["lease_id"]


def _made_lost(b: Any, lease_id: str) -> None:
    """The lease as the broker records one Vault forgot (tests/integration/test_lost_leases
    makes one the real way)."""
    _sql(b, "UPDATE leases SET state = 'lost', ended_at = :now WHERE lease_id = :lid",
         now=datetime.now(UTC), lid=lease_id)


def _row(b: Any, lease_id: str) -> dict[str, Any]:
    [row] = [r for r in b.rows("leases") if r["lease_id"] == lease_id]
    return row


async def _resolve(http: Any, b: Any, lease_id: str, token: str = ADMIN_TOKEN,
                   body: Any = None) -> tuple[int, Any]:
    async with http.post(f"{b.url}/v1/admin/leases/{lease_id}/resolve", headers=bearer(token),
                         json={"reason": "ended by hand"} if body is None else body) as resp:
        return resp.status, await resp.json()


async def test_a_read_operator_is_refused_audited_and_a_revoke_operator_resolves(guarded,
                                                                                  http):
    lid = await _issued(http, guarded, "i-res-scope")
    _made_lost(guarded, lid)
    before = _row(guarded, lid)

    status, body = await _resolve(http, guarded, lid, READER)
    assert (status, body["error"]["code"]) == (403, "operator_scope_insufficient")
    assert _row(guarded, lid) == before
    [refusal] = events(guarded, "admin.refused")
    assert (refusal["actor"], refusal["outcome"], refusal["reason"]) == (
        "operator:reader", "refused", "operator_scope_insufficient")
    assert (refusal["detail"]["method"], refusal["detail"]["route"],
            refusal["detail"]["scope"]) == ("POST", "/v1/admin/leases/{lease_id}/resolve",
                                            "revoke")
    assert events(guarded, "lease.resolved") == []

    status, body = await _resolve(http, guarded, lid, REVOKER)
    assert status == 200, body
    assert (body["changed"], body["lease"]["state"], body["lease"]["resolution"]["by"]) == (
        True, "resolved", "operator:revoker")
    [event] = events(guarded, "lease.resolved")
    assert (event["actor"], event["lease_id"]) == ("operator:revoker", lid)


@pytest.mark.parametrize("lease_id", ["l-" + "0" * 32, "l-nothex", "L-" + "a" * 32],
                         ids=["unknown", "malformed", "capitals"])
async def test_an_unknown_lease_is_not_found_and_nothing_is_written(guarded, http, lease_id):
    before = guarded.store_snapshot()
    status, body = await _resolve(http, guarded, lease_id)
    assert (status, body["error"]["code"]) == (404, "lease_not_found")
    assert guarded.store_snapshot() == before


@pytest.mark.parametrize("state", ["active", "revoked", "expired", "released"])
async def test_a_lease_that_is_not_lost_is_refused_409(guarded, http, state):
    lid = await _issued(http, guarded, f"i-res-{state}")
    if state != "active":
        _sql(guarded, "UPDATE leases SET state = :s WHERE lease_id = :lid", s=state, lid=lid)
    before, snapshot = _row(guarded, lid), guarded.store_snapshot()
    status, body = await _resolve(http, guarded, lid)
    assert (status, body["error"]["code"]) == (409, "lease_not_lost")
    assert body["error"]["message"].startswith(f"the lease is {state}, not lost")
    assert _row(guarded, lid) == before
    assert guarded.store_snapshot() == snapshot
    assert events(guarded, "lease.resolved") == []


@pytest.mark.parametrize("body,code", [
    ({}, "invalid_reason"),
    ({"reason": ""}, "invalid_reason"),
    ({"reason": "   "}, "invalid_reason"),
    ({"reason": None}, "invalid_reason"),
    ({"reason": "x" * 201}, "invalid_reason"),
    ({"reason": "ended\u202eby hand"}, "invalid_reason"),
    ({"reason": "ok", "incident": " INC-1"}, "invalid_incident"),
    ({"reason": "ok", "state": "resolved"}, "unknown_field"),
], ids=["missing", "empty", "blank", "null", "too-long", "bidi", "incident", "unknown-field"])
async def test_a_resolution_must_say_why(guarded, http, body, code):
    lid = await _issued(http, guarded, "i-res-why")
    _made_lost(guarded, lid)
    before = _row(guarded, lid)
    status, answer = await _resolve(http, guarded, lid, body=body)
    assert (status, answer["error"]["code"]) == (400, code)
    assert _row(guarded, lid) == before
    assert events(guarded, "lease.resolved") == []
