"""The error middleware's log lines, on a bare application: one ``request refused`` line
per refusal (a broker error, an HTTP error of aiohttp's own) with what the request
gathered and the client's address, 5xx at warning; a crash logged with the same fields;
nothing gathered by one request reaches the next on the same connection."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from broker.api import requestlog
from broker.api.errors import make_middleware
from broker.api.metrics import Metrics
from broker.errors import Locked, NotPermitted, UpstreamRejected
from broker.logs import note_request


async def _refused(request: web.Request) -> web.Response:
    note_request(instance_id="i-1", workload="payments", role="dev-db", secretless=None)
    raise NotPermitted("no", issuer_name="dev")


async def _locked(request: web.Request) -> web.Response:
    note_request(instance_id="i-2")
    raise Locked("k-1")


async def _upstream(request: web.Request) -> web.Response:
    note_request(lease_id="l-1")
    raise UpstreamRejected("Vault refused", code="vault_permission_denied")


async def _crash(request: web.Request) -> web.Response:
    note_request(instance_id="i-3")
    raise RuntimeError("boom")


async def _served(request: web.Request) -> web.Response:
    note_request(instance_id="i-4", role="dev-cert")
    requestlog.served(requestlog.ISSUED, lease_id="l-4", kind="x509_certificate")
    return web.json_response({})


@pytest.fixture
async def url() -> AsyncIterator[str]:
    app = web.Application(middlewares=[make_middleware(Metrics())])
    for path, handler in (("/refused", _refused), ("/locked", _locked),
                          ("/upstream", _upstream), ("/crash", _crash),
                          ("/served", _served)):
        app.router.add_post(path, handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def _lines(url: str, caplog: pytest.LogCaptureFixture,
                 *paths: str) -> list[logging.LogRecord]:
    caplog.set_level(logging.DEBUG, logger="broker.api")
    caplog.clear()
    async with aiohttp.ClientSession() as http:  # one connection, kept alive
        for path in paths:
            async with http.post(f"{url}{path}") as resp:
                await resp.read()
    return [r for r in caplog.records if r.name == "broker.api"]


def _fields(record: logging.LogRecord, *names: str) -> dict[str, Any]:
    return {n: getattr(record, n) for n in names if hasattr(record, n)}


ALL = ("client", "issuer", "instance_id", "workload", "role", "lease_id", "route", "status",
       "code", "lock_id", "kind", "secretless")


async def test_each_refusal_is_one_line_with_what_the_request_gathered(url, caplog) -> None:
    records = await _lines(url, caplog, "/refused", "/locked", "/upstream", "/nothing", "/served")
    assert [(r.getMessage(), r.levelname) for r in records] == [
        ("request refused", "INFO"), ("request refused", "INFO"),
        ("request refused", "WARNING"), ("request refused", "INFO"),
        ("credential issued", "INFO")]
    client = {"client": "127.0.0.1"}
    assert [_fields(r, *ALL) for r in records] == [
        {**client, "instance_id": "i-1", "workload": "payments", "role": "dev-db",
         "route": "/refused", "status": 403, "code": "role_not_permitted", "issuer": "dev"},
        # the previous request's identifiers are gone; the lock's id is there
        {**client, "instance_id": "i-2", "route": "/locked", "status": 403, "code": "locked",
         "lock_id": "k-1"},
        {**client, "lease_id": "l-1", "route": "/upstream", "status": 502,
         "code": "vault_permission_denied"},
        {**client, "route": "unmatched", "status": 404, "code": "not_found"},
        {**client, "instance_id": "i-4", "role": "dev-cert", "lease_id": "l-4",
         "kind": "x509_certificate"},
    ]


async def test_a_crash_is_logged_with_the_requests_fields(url, caplog) -> None:
    [record] = await _lines(url, caplog, "/crash")
    assert record.getMessage() == "unhandled error" and record.levelname == "ERROR"
    assert _fields(record, *ALL) == {"client": "127.0.0.1", "instance_id": "i-3",
                                     "route": "/crash"}
