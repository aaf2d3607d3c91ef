"""Requests the HTTP parser refuses, against a real broker on loopback: a header past the
broker's limit (a bearer token padded out, as someone probing with huge tokens would send),
a request line past 16 KiB and bytes that are not HTTP, each on a raw socket. Each gets
the JSON refusal, is counted in ``broker_requests_refused_total`` by its code with no
issuer (what /metrics then shows), and is logged as one ``request refused`` line (route
``unparsed``) holding nothing of the header or the request line, masked or not."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from broker.logs import JsonFormatter

# Markers in what is sent, to look for in the log afterwards.
PATH_MARK = "line-probe-7c1e"
GARBAGE = b"\x16\x03\x01\x02\x00garbage-probe-51d9\r\n\r\n"


async def _exchange(url: str, request: bytes) -> tuple[int, dict[str, Any]]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


async def _refused(http: Any, url: str) -> dict[tuple[str, str], float]:
    """broker_requests_refused_total by (code, issuer), as /metrics shows it."""
    async with http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {(s.labels["code"], s.labels["issuer"]): s.value
            for family in text_string_to_metric_families(text)
            if family.name == "broker_requests_refused"
            for s in family.samples if s.name == "broker_requests_refused_total"}


async def test_parser_refusals_are_counted_by_code_and_logged_without_the_request(
        broker, http, caplog):
    caplog.set_level(logging.DEBUG)
    limit = broker.broker.components.server.max_header_bytes
    token = broker.token("i-huge-header")  # a real token, padded past the header limit
    padded = token + "A" * limit
    header = (f"GET /v1/leases HTTP/1.1\r\nHost: broker\r\nAuthorization: Bearer {padded}"
              "\r\nConnection: close\r\n\r\n").encode()
    line = f"GET /v1/credentials?{PATH_MARK}={'x' * 16 * 1024} HTTP/1.1\r\n\r\n".encode()
    before = await _refused(http, broker.url)

    answers = [await _exchange(broker.url, request)
               for request in (header, header, line, GARBAGE)]
    assert [(status, body["error"]["code"]) for status, body in answers] == [
        (431, "header_too_large"), (431, "header_too_large"), (414, "uri_too_long"),
        (400, "bad_request")]

    after = await _refused(http, broker.url)
    grown = {key: after[key] - before.get(key, 0.0) for key in after
             if after[key] != before.get(key, 0.0)}
    assert grown == {("header_too_large", ""): 2.0, ("uri_too_long", ""): 1.0,
                     ("bad_request", ""): 1.0}

    fmt = JsonFormatter()
    lines = [json.loads(fmt.format(r)) for r in caplog.records
             if r.getMessage() == "request refused" and getattr(r, "route", None) == "unparsed"]
    assert [{k: v for k, v in ln.items() if k != "ts"} for ln in lines] == [
        {"level": "info", "logger": "broker.api", "msg": "request refused",
         "route": "unparsed", "status": 431, "code": "header_too_large",
         "client": "127.0.0.1"},
    ] * 2 + [
        {"level": "info", "logger": "broker.api", "msg": "request refused",
         "route": "unparsed", "status": 414, "code": "uri_too_long", "client": "127.0.0.1"},
        # Not HTTP at all: noise, at debug (still counted above).
        {"level": "debug", "logger": "broker.api", "msg": "request refused",
         "route": "unparsed", "status": 400, "code": "bad_request", "client": "127.0.0.1"},
    ]
    # Nothing of what was sent, in any record of any logger, before masking or after.
    signature = token.rsplit(".", 1)[1]
    for record in caplog.records:
        for shown in (repr(record.__dict__), fmt.format(record)):
            for sent in (signature, token[:40], "AAAAAAAA", PATH_MARK, "garbage-probe"):
                assert sent not in shown, (record.getMessage(), sent)
