"""Requests aiohttp refuses before the application sees them get the broker's JSON error
shape: a header past the server's limit (431 ``header_too_large``), a request line past
its limit (414 ``uri_too_long``), bytes that are not HTTP (400 ``bad_request``); the limit
follows the issuers' ``max_token_bytes``; each is counted in the refusal metric by its
code (no issuer) and logged as one ``request refused`` line (route ``unparsed``, bytes that
are not HTTP at debug); nothing of the refused header or request line is echoed or logged.
The mapping is pure; the rest is checked against a real server over a socket."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    InvalidHeader,
    LineTooLong,
)

from broker.api.metrics import Metrics
from broker.app import assemble
from broker.app.http import MAX_HEADER_BYTES, MAX_LINE_BYTES, HttpServer
from broker.app.http_refusals import HEADER_SLACK_BYTES, header_limit, refusal
from broker.config import load_settings
from broker.dev.environment import dev_settings_dict

LIMIT = header_limit(16 * 1024)


def test_the_header_limit_lets_the_largest_token_through_with_its_framing() -> None:
    assert header_limit(16 * 1024) == 16 * 1024 + len("Authorization") + len("Bearer ") + \
        HEADER_SLACK_BYTES
    assert MAX_HEADER_BYTES == header_limit(64 * 1024)  # the largest max_token_bytes allowed


@pytest.mark.parametrize(("exc", "expected"), [
    (LineTooLong(b"Bearer x...", LIMIT), (431, "header_too_large")),
    (LineTooLong(b"/aaaa...", MAX_LINE_BYTES), (414, "uri_too_long")),
    (LineTooLong(b"x", "Unknown"), (431, "header_too_large")),
    (BadHttpMessage("Too many headers received"), (400, "bad_request")),
    (InvalidHeader(b"Bad Header"), (400, "bad_request")),
    (BadHttpMethod("\x16\x03\x01"), (400, "bad_request")),
    (ValueError("not a parse error"), None),
    (None, None),
], ids=["header", "request-line", "limit-unknown", "too-many-headers", "invalid-header",
        "not-http", "other-exception", "no-exception"])
def test_parse_errors_map_to_a_status_and_code(exc: BaseException | None,
                                               expected: tuple[int, str] | None) -> None:
    answer = refusal(exc, line_limit=MAX_LINE_BYTES, field_limit=LIMIT)
    assert (answer[:2] if answer else None) == expected
    if answer is not None:
        assert "Bearer" not in answer[2] and "aaaa" not in answer[2]


def test_equal_limits_are_read_as_the_header_limit() -> None:
    answer = refusal(LineTooLong(b"x", 9000), line_limit=9000, field_limit=9000)
    assert answer is not None and answer[:2] == (431, "header_too_large")


# ------------------------------------------------------------------ a real server


async def _echo(request: web.Request) -> web.Response:
    return web.json_response({"authorization_bytes": len(request.headers.get(
        "Authorization", ""))})


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def server(metrics: Metrics) -> AsyncIterator[tuple[str, int]]:
    app = web.Application()
    app.router.add_get("/", _echo)
    http = HttpServer(app, "127.0.0.1", 0, max_header_bytes=LIMIT, counted=metrics)
    url = await http.bind()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    yield host, int(port)
    await http.close()


def _refused(metrics: Metrics) -> dict[tuple[str, str], float]:
    """broker_requests_refused_total by (code, issuer), as /metrics would show it."""
    return {(s.labels["code"], s.labels["issuer"]): s.value
            for family in metrics.registry.collect() if family.name == "broker_requests_refused"
            for s in family.samples if s.name == "broker_requests_refused_total"}


def _refusal_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "request refused"]


async def _exchange(where: tuple[str, int], request: bytes) -> tuple[int, dict[str, str],
                                                                      bytes]:
    reader, writer = await asyncio.open_connection(*where)
    try:
        writer.write(request)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


def _bearer(token_bytes: int) -> bytes:
    token = b"eyJ" + b"A" * (token_bytes - 3)
    return (b"GET / HTTP/1.1\r\nHost: broker\r\nAuthorization: Bearer " + token +
            b"\r\nConnection: close\r\n\r\n")


async def test_a_header_past_the_limit_gets_a_json_431_that_echoes_nothing(
        server: tuple[str, int], metrics: Metrics,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    status, headers, body = await _exchange(server, _bearer(LIMIT))
    assert status == 431
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert json.loads(body) == {"error": {
        "code": "header_too_large",
        "message": f"a request header is larger than the broker's limit of {LIMIT} bytes"}}
    logged = [r for r in caplog.records if r.name.startswith(("aiohttp", "broker"))]
    assert all(r.levelno < logging.WARNING for r in logged), [r.getMessage() for r in logged]
    assert all(b"AAAA" not in repr(r.__dict__).encode() for r in logged)
    assert all(b"eyJ" not in repr(r.__dict__).encode() for r in logged)
    (line,) = _refusal_lines(caplog)
    assert line.name == "broker.api" and line.levelno == logging.INFO
    assert {k: line.__dict__.get(k) for k in ("route", "status", "code", "client")} == {
        "route": "unparsed", "status": 431, "code": "header_too_large", "client": "127.0.0.1"}
    assert _refused(metrics) == {("header_too_large", ""): 1.0}


async def test_a_token_of_the_largest_configured_size_reaches_the_application(
        server: tuple[str, int], metrics: Metrics) -> None:
    """Every token the verifier may accept (here 16 KiB) passes the HTTP parser, so the
    verifier, not aiohttp, is what refuses an over-long one (401 token_too_large)."""
    for size in (16 * 1024, 16 * 1024 + 1, LIMIT - len("Authorization") - len("Bearer ")):
        status, _, body = await _exchange(server, _bearer(size))
        assert (status, json.loads(body)) == (200, {"authorization_bytes": size + 7})
    assert _refused(metrics) == {}  # served, not refused


@pytest.mark.parametrize(("request_bytes", "status", "code", "level"), [
    (b"GET /" + b"a" * MAX_LINE_BYTES + b" HTTP/1.1\r\nHost: b\r\n\r\n", 414, "uri_too_long",
     logging.INFO),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "bad_request",
     logging.DEBUG),
    (b"GET / HTTP/1.1\r\nHost: b\r\nBad Header: x\r\n\r\n", 400, "bad_request", logging.INFO),
], ids=["request-line", "tls-hello", "invalid-header"])
async def test_other_unparsable_requests_get_json_too_and_are_counted_and_logged(
        server: tuple[str, int], metrics: Metrics, caplog: pytest.LogCaptureFixture,
        request_bytes: bytes, status: int, code: str, level: int) -> None:
    """Counted every one; logged at info, except bytes that are not HTTP at all (a TLS
    hello, a port scan: noise) at debug. Neither line nor count holds the request."""
    caplog.set_level(logging.DEBUG)
    got, headers, body = await _exchange(server, request_bytes)
    assert (got, json.loads(body)["error"]["code"]) == (status, code)
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert _refused(metrics) == {(code, ""): 1.0}
    (line,) = _refusal_lines(caplog)
    assert (line.levelno, line.__dict__["route"], line.__dict__["status"],
            line.__dict__["code"]) == (level, "unparsed", status, code)
    logged = repr([r.__dict__ for r in caplog.records if r.name.startswith("broker")])
    assert "aaaa" not in logged and "Bad Header" not in logged and "\\x16" not in logged


async def test_refusals_are_counted_per_code_across_connections(
        server: tuple[str, int], metrics: Metrics) -> None:
    for request_bytes in (_bearer(LIMIT), _bearer(LIMIT + 1),
                          b"GET /" + b"a" * MAX_LINE_BYTES + b" HTTP/1.1\r\n\r\n",
                          b"\x16\x03\x01\x00\r\n\r\n"):
        await _exchange(server, request_bytes)
    assert _refused(metrics) == {("header_too_large", ""): 2.0, ("uri_too_long", ""): 1.0,
                                 ("bad_request", ""): 1.0}


async def test_a_server_without_a_count_still_answers_json() -> None:
    app = web.Application()
    http = HttpServer(app, "127.0.0.1", 0, max_header_bytes=LIMIT)
    url = await http.bind()
    try:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        status, _, body = await _exchange((host, int(port)), _bearer(LIMIT))
        assert (status, json.loads(body)["error"]["code"]) == (431, "header_too_large")
    finally:
        await http.close()


async def test_the_broker_sizes_its_header_limit_from_the_largest_token_it_accepts(
        tmp_path: Path) -> None:
    data: dict[str, Any] = dev_settings_dict(
        vault_addr="http://127.0.0.1:1", broker_token="s.not-a-real-token",
        issuer="http://127.0.0.1:2", jwks_uri="http://127.0.0.1:2/jwks.json",
        store_url=f"sqlite:///{tmp_path / 'broker.db'}", admin_token_sha256="0" * 64,
        with_database=False, port=0)
    operators = {"issuer": "https://sso.example.org", "discovery": True,
                 "audience": "brokerctl", "max_token_bytes": 60_000,
                 "scopes": [{"claim": "groups", "value": "sec", "scope": "read"}]}
    for size, oidc, limit in ((16 * 1024, None, 16 * 1024), (40_000, None, 40_000),
                              (40_000, operators, 60_000)):
        data["identity"]["issuers"][0]["max_token_bytes"] = size
        data["admin"]["oidc"] = oidc
        parts = assemble(load_settings(data))
        try:
            assert parts.server.max_header_bytes == header_limit(limit)
        finally:
            await parts.http.close()
