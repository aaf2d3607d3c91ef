"""Hypothesis against a running broker: a valid dev-issuer token, mutated one character at
a time or one claim at a time (re-encoded, never re-signed), is never exchanged for a
credential, never makes the broker fail (>= 500) and always gets a JSON error body.

The broker serves on the test's event loop, so the blocking requests (urllib) and the
``@given`` function run in a worker thread (``asyncio.to_thread``): the loop stays free
to answer them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import string
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

FUZZ_SETTINGS = settings(max_examples=150, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture])
# Characters a token may be mutated with. All are legal in an HTTP field value (visible
# ASCII, space, obs-text): control characters are refused by aiohttp's HTTP parser with a
# plain-text 400 before the request reaches the broker, so they test nothing of it.
INSERTABLE = (string.ascii_letters + string.digits + "-_.=+/ !\"#$%&'()*,:;<>?@[\\]^`{|}~"
              + "\u00e9\u00ff\u00a0\u0085")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def _legal_in_header(c: str) -> bool:
    return c in (" ", "\t") or 0x21 <= ord(c) <= 0x7E or 0x80 <= ord(c) <= 0xFF


def post(url: str, token: str) -> tuple[int, str, bytes]:
    req = urllib.request.Request(
        f"{url}/v1/credentials", data=b'{"role": "dev-cert"}', method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with _OPENER.open(req, timeout=10) as resp:
            return resp.status, resp.headers.get_content_type(), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get_content_type(), exc.read()


def check_refused(url: str, token: str, seen: Counter[str]) -> None:
    status, content_type, raw = post(url, token)
    assert status != 201, f"mutated token accepted: {token!r}"
    assert 400 <= status < 500, (status, raw[:300], token)
    assert content_type == "application/json", (status, raw[:300], token)
    body = json.loads(raw)
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    seen[body["error"]["code"]] += 1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


async def _baseline(make_broker) -> tuple[Any, str]:
    b = await make_broker()
    token = b.token("i-fuzz")
    # The oracle works: the unmutated token is exchanged (so a 201 below would be caught).
    status, _, raw = await asyncio.to_thread(post, b.url, token)
    assert status == 201, raw
    return b, token


async def test_token_mutated_one_character_is_never_accepted(make_broker, vault):
    b, token = await _baseline(make_broker)
    before = (b.store_snapshot(), vault.snapshot())
    seen: Counter[str] = Counter()

    @st.composite
    def char_mutation(draw: st.DrawFn) -> str:
        op = draw(st.sampled_from(["flip", "insert", "delete", "replace"]))
        if op == "insert":
            i = draw(st.integers(0, len(token)))
            return token[:i] + draw(st.sampled_from(INSERTABLE)) + token[i:]
        i = draw(st.integers(0, len(token) - 1))
        if op == "delete":
            return token[:i] + token[i + 1:]
        if op == "replace":
            c = draw(st.sampled_from(INSERTABLE).filter(lambda c: c != token[i]))
        else:
            c = chr(ord(token[i]) ^ (1 << draw(st.integers(0, 7))))
            assume(_legal_in_header(c))
        return token[:i] + c + token[i + 1:]

    def run() -> None:
        @FUZZ_SETTINGS
        @given(char_mutation())
        def one(mutated: str) -> None:
            # aiohttp drops blanks around a field value and the broker strips the token:
            # a blank added at either end leaves the very token that was accepted.
            assume(mutated.strip(" \t") != token)
            check_refused(b.url, mutated, seen)

        one()

    await asyncio.to_thread(run)

    assert (b.store_snapshot(), vault.snapshot()) == before
    assert seen.total() >= 100, seen
    assert {"token_malformed", "token_bad_signature"} <= set(seen), seen


_SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


async def test_token_with_one_claim_changed_and_not_resigned_is_never_accepted(make_broker,
                                                                              vault):
    b, token = await _baseline(make_broker)
    head_seg, payload_seg, sig = token.split(".")
    documents = {"header": json.loads(_unb64(head_seg)),
                 "payload": json.loads(_unb64(payload_seg))}
    before = (b.store_snapshot(), vault.snapshot())
    seen: Counter[str] = Counter()

    @st.composite
    def claim_mutation(draw: st.DrawFn) -> str:
        part = draw(st.sampled_from(["header", "payload"]))
        doc: Any = dict(documents[part])
        op = draw(st.sampled_from(["delete", "set", "add", "whole"]))
        if op == "delete":
            del doc[draw(st.sampled_from(sorted(doc)))]
        elif op == "set":
            doc[draw(st.sampled_from(sorted(doc)))] = draw(_JSON)
        elif op == "add":
            doc[draw(st.text(min_size=1, max_size=8))] = draw(_JSON)
        else:
            doc = draw(_JSON)
        encoded = _b64(json.dumps(doc, separators=(",", ":")).encode())
        segments = [head_seg, payload_seg, sig]
        segments[0 if part == "header" else 1] = encoded
        return ".".join(segments)

    def run() -> None:
        @FUZZ_SETTINGS
        @given(claim_mutation())
        def one(mutated: str) -> None:
            assume(mutated != token)
            check_refused(b.url, mutated, seen)

        one()

    await asyncio.to_thread(run)

    assert (b.store_snapshot(), vault.snapshot()) == before
    assert seen.total() >= 100, seen
    # Most mutations get as far as the signature check, and fail there.
    assert "token_bad_signature" in seen, seen
