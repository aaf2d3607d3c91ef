"""``VaultClient.list_lease_keys`` against a scripted HTTP server on loopback: only Vault's
own empty answer (404 with exactly ``{"errors": []}``) is an empty listing; any other 404
(a proxy's page, a missing route) is a refusal, and a prefix is never unescaped, since the
revocation worker takes a lease missing from a listing for one that may be gone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker.clock import SystemClock
from broker.errors import UpstreamRejected
from broker.vault.client import VaultClient
from broker.vault.identity import needs
from broker.vault.settings import VaultSettings

ALL_CAPS = {n.path: list(n.capabilities) for n in needs("broker-instance")}


class Script:
    def __init__(self) -> None:
        self.status = 200
        self.body: Any = {"data": {"keys": ["a", "b/"]}}
        self.paths: list[str] = []


@pytest.fixture
async def vault() -> AsyncIterator[tuple[VaultClient, Script]]:
    """A raw HTTP server (aiohttp's own server refuses the LIST method): start-up's two
    calls, and the scripted answer for any LIST."""
    script = Script()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        method, path, _ = head.split("\r\n", 1)[0].split(" ", 2)
        length = next(
            (
                int(line.split(":", 1)[1])
                for line in head.split("\r\n")
                if line.lower().startswith("content-length:")
            ),
            0,
        )
        await reader.readexactly(length)
        status, body, kind = 200, "{}", "application/json"
        if path.endswith("/lookup-self"):
            body = json.dumps({"data": {"ttl": 0, "creation_ttl": 0, "renewable": False}})
        elif path.endswith("/capabilities-self"):
            body = json.dumps({"data": ALL_CAPS})
        elif method == "LIST":
            script.paths.append(path)
            status = script.status
            if isinstance(script.body, str):
                body, kind = script.body, "text/html"
            else:
                body = json.dumps(script.body)
        data = body.encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = VaultSettings.model_validate(
        {"addr": f"http://127.0.0.1:{port}", "auth": {"method": "token", "token": "s.t"}}
    )
    client = VaultClient(settings, SystemClock())
    await client.start()
    try:
        yield client, script
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def test_keys_are_listed(vault: tuple[VaultClient, Script]) -> None:
    client, script = vault
    assert await client.list_lease_keys("pki/issue/dev-cert") == ["a", "b/"]
    assert script.paths == ["/v1/sys/leases/lookup/pki/issue/dev-cert/"]


async def test_vaults_own_empty_answer_is_an_empty_listing(
    vault: tuple[VaultClient, Script],
) -> None:
    client, script = vault
    script.status, script.body = 404, {"errors": []}
    assert await client.list_lease_keys("pki/issue/dev-cert") == []


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"errors": ["no handler for route"]},
        {"errors": [], "data": {}},
        "<html>404 Not Found</html>",
    ],
    ids=["empty-object", "an-error", "extra-keys", "a-proxy-page"],
)
async def test_any_other_404_is_no_evidence_of_an_empty_path(
    vault: tuple[VaultClient, Script], body: Any
) -> None:
    client, script = vault
    script.status, script.body = 404, body
    with pytest.raises(Exception) as refused:
        await client.list_lease_keys("pki/issue/dev-cert")
    # A refusal (JSON) or Vault unreachable (not JSON at all): never an empty listing.
    assert getattr(refused.value, "code", None) in ("vault_rejected", "vault_unavailable")


async def test_an_escaped_segment_is_refused_not_unescaped(
    vault: tuple[VaultClient, Script],
) -> None:
    client, script = vault
    with pytest.raises(UpstreamRejected) as refused:
        await client.list_lease_keys("pki/issue/dev%2Dcert")
    assert refused.value.code == "vault_path_refused"
    assert script.paths == []
