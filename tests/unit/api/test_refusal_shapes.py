"""Refusals a client can reach with a schema-valid request or a wrong method, as the OpenAPI
document describes them: a 405 names the allowed methods in ``Allow`` (RFC 9110) and is JSON."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from broker.api.errors import make_middleware
from broker.api.metrics import Metrics


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({})


@pytest.fixture
async def url() -> AsyncIterator[str]:
    app = web.Application(middlewares=[make_middleware(Metrics())])
    app.router.add_post("/thing", _ok)
    app.router.add_delete("/thing", _ok)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def test_a_wrong_method_is_answered_405_with_allow_and_a_json_error(url: str) -> None:
    async with aiohttp.ClientSession() as http, http.request("PATCH", f"{url}/thing") as resp:
        assert resp.status == 405
        assert set(resp.headers["Allow"].split(",")) == {"POST", "DELETE"}
        body = await resp.json()
    assert body["error"]["code"] == "method_not_allowed"


async def test_an_unknown_path_has_no_allow_header(url: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/nothing") as resp:
        assert resp.status == 404
        assert "Allow" not in resp.headers
