"""The broker's HTTP API as the tests drive it: exchange, release, terminate and wait."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def issue(http: Any, b: Any, instance: str, role: str, **body: Any) -> tuple[int, Any]:
    async with http.post(
        f"{b.url}/v1/credentials", headers=bearer(b.token(instance)), json={"role": role, **body}
    ) as resp:
        return resp.status, await resp.json()


async def release(http: Any, b: Any, instance: str, lease_id: str) -> None:
    """Give a lease back as its workload does; Vault drops the login before the 204."""
    async with http.delete(
        f"{b.url}/v1/leases/{lease_id}", headers=bearer(b.token(instance))
    ) as resp:
        assert resp.status == 204, await resp.text()


async def terminate(http: Any, b: Any, instance: str, timeout: float = 30.0) -> dict[str, Any]:
    """Terminate ``instance`` and wait for its revocation job to finish; the instance."""
    async with http.post(f"{b.url}/v1/instances/{instance}/terminate", headers=b.admin()) as resp:
        assert resp.status == 202, await resp.text()
    return await wait_job(http, b, instance, timeout)


async def wait_job(http: Any, b: Any, instance: str, timeout: float = 30.0) -> dict[str, Any]:
    """Wait, bounded, until the instance's revocation job is done or failed; the instance."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        async with http.get(f"{b.url}/v1/instances/{instance}", headers=b.admin()) as resp:
            shown = await resp.json()
        if shown["job"] and shown["job"]["state"] in ("done", "failed"):
            return shown
        assert loop.time() < deadline, f"revocation job not finished in {timeout}s: {shown}"
        await asyncio.sleep(0.1)


async def eventually(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Wait, bounded, for something the server does just after answering (a signalled
    session takes a moment to go)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.05)
