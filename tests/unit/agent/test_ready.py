"""The probe endpoint: 200 only when every credential is written and none refused, each
credential's status and expiry shown, and nothing else (no value, no lease id)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from aiohttp.test_utils import TestClient, TestServer

from broker.agent.plan import CredentialStatus, Status
from broker.agent.ready import ready_app, status_document

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def test_status_document() -> None:
    statuses = {"db": CredentialStatus(Status.READY, NOW + timedelta(minutes=5)),
                "x": CredentialStatus(Status.REFUSED, None, "role_not_permitted")}
    assert status_document(statuses, NOW) == {
        "ready": False,
        "credentials": {"db": {"status": "ready", "expires_at": "2030-01-01T00:05:00Z"},
                        "x": {"status": "refused", "code": "role_not_permitted"}}}
    later = status_document(statuses, NOW + timedelta(minutes=6))
    assert later["credentials"]["db"]["status"] == "expired"  # type: ignore[index]


async def test_endpoints() -> None:
    statuses = {"db": CredentialStatus(Status.PENDING)}
    async with TestClient(TestServer(ready_app(lambda: statuses, lambda: NOW))) as client:
        resp = await client.get("/ready")
        assert (resp.status, await resp.json()) == (
            503, {"ready": False, "credentials": {"db": {"status": "pending"}}})
        statuses["db"] = CredentialStatus(Status.READY, NOW + timedelta(seconds=1))
        resp = await client.get("/ready")
        assert resp.status == 200 and (await resp.json())["ready"] is True
        resp = await client.get("/healthz")
        assert (resp.status, await resp.json()) == (200, {"status": "ok"})
        assert (await client.get("/metrics")).status == 404
