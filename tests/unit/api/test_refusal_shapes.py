"""Refusals a client can reach with a schema-valid request or a wrong method, as the OpenAPI
document describes them: a 405 names the allowed methods in ``Allow`` (RFC 9110) and is JSON;
the printable-text check and the document's pattern agree; a whole-number float is a ttl."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from broker.api import decode
from broker.api.errors import make_middleware
from broker.api.metrics import Metrics
from broker.errors import BadRequest


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


@pytest.mark.parametrize(
    "text",
    [
        "INC-1234",
        "https://tickets.example/1",
        "café ünïcode 日本",
        "",
        "a b",
        "a\nb",
        "\x00",
        "\x7f",
        "\x85",
        "\u00a0",
        "\u00ad",
        "\u200b",
        "\u202e",
        "\u2028",
        "\u1680",
        "\u3000",
        "\ufeff",
        "\u061c",
    ],
)
def test_printable_text_and_the_documented_pattern_agree(text: str) -> None:
    assert decode.printable(text) == bool(re.match(decode.PRINTABLE_PATTERN, text))


def test_a_lone_surrogate_is_not_printable_text() -> None:
    assert not decode.printable("a\ud800")


@pytest.mark.parametrize(("value", "seconds"), [(60.0, 60), (60, 60), ("10m", 600)])
def test_ttl_takes_a_whole_number_however_json_wrote_it(value: object, seconds: int) -> None:
    assert decode.ttl({"ttl": value}) == seconds


@pytest.mark.parametrize("value", [60.5, True, "0s", 0])
def test_ttl_refuses_what_the_document_refuses(value: object) -> None:
    with pytest.raises(BadRequest):
        decode.ttl({"ttl": value})
