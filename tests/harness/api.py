"""The broker's HTTP API as the tests drive it: exchange, release, terminate and wait."""

from __future__ import annotations

from typing import Any

from tests.harness.wait import eventually


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def issue(
    http: Any, b: Any, instance: str, role: str, *, workload: str = "payments", **body: Any
) -> tuple[int, Any]:
    async with http.post(
        f"{b.url}/v1/credentials",
        headers=bearer(b.token(instance, workload)),
        json={"role": role, **body},
    ) as resp:
        return resp.status, await resp.json()


async def release(http: Any, b: Any, instance: str, lease_id: str) -> None:
    """Give a lease back as its workload does; Vault drops the login before the 204."""
    async with http.delete(
        f"{b.url}/v1/leases/{lease_id}", headers=bearer(b.token(instance))
    ) as resp:
        assert resp.status == 204, await resp.text()


async def terminate(
    http: Any,
    b: Any,
    instance: str,
    timeout: float = 30.0,
    until: tuple[str, ...] = ("done", "failed"),
) -> dict[str, Any]:
    """Terminate ``instance`` and wait for its revocation job to reach ``until`` (see
    ``wait_job``); the instance."""
    async with http.post(f"{b.url}/v1/instances/{instance}/terminate", headers=b.admin()) as resp:
        assert resp.status == 202, await resp.text()
    return await wait_job(http, b, instance, timeout, until)


async def wait_job(
    http: Any,
    b: Any,
    instance: str,
    timeout: float = 30.0,
    until: tuple[str, ...] = ("done", "failed"),
) -> dict[str, Any]:
    """Wait, bounded, until the instance's revocation job is in one of the states ``until``
    (or its last error is one of them); the instance."""
    shown: dict[str, Any] = {}

    async def finished() -> dict[str, Any] | None:
        nonlocal shown
        async with http.get(f"{b.url}/v1/instances/{instance}", headers=b.admin()) as resp:
            shown = await resp.json()
        job = shown["job"]
        return shown if job and (job["state"] in until or job["last_error"] in until) else None

    return await eventually(
        finished, lambda: f"revocation job of {instance} not finished: {shown}", timeout, 0.1
    )
