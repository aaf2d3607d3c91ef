"""The token-exchange door (``POST /v1/token``) under a security review: every answer it
gives is uncacheable (the middleware's 405 and 500 too, not only the handler's), a body
is a form and nothing else however it is dressed, the subject token comes from the form
alone, and ``requested_token_type`` cannot tell a role the caller may have from one that
does not exist (a locked workload learning its roles and their kinds that way)."""

from __future__ import annotations

import gzip
import json
from typing import Any
from urllib.parse import urlencode

import pytest

from broker.api import oauth
from broker.api.oauth import BROKER_TOKEN_TYPE, GRANT_TYPE, JWT, TARGET_REFUSED
from tests.security.test_token_refusals import _assert_refused, _exchange, _form

FORM = "application/x-www-form-urlencoded"


@pytest.fixture
async def sec(make_broker):
    return await make_broker()


def _never_cached(headers: Any) -> None:
    assert (headers.get("Cache-Control"), headers.get("Pragma")) == ("no-store", "no-cache")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_a_method_not_allowed_is_never_cached(sec, http, method):
    async with http.request(method, f"{sec.url}/v1/token") as resp:
        assert resp.status == 405
        _never_cached(resp.headers)


async def test_an_unexpected_failure_is_never_cached(sec, http, vault, monkeypatch):
    def broken(credential: Any) -> dict[str, Any]:
        raise RuntimeError("a bug in shaping the answer")

    monkeypatch.setattr(oauth, "token_response", broken)
    status, raw, headers = await _exchange(http, sec, _form(sec.token("i-tx-500")))
    assert status == 500, raw
    _never_cached(headers)


async def test_the_handlers_own_answers_are_never_cached(sec, http, vault):
    status, _, headers = await _exchange(http, sec, _form(sec.token("i-tx-ok")))
    assert status == 200
    _never_cached(headers)
    status, _, headers = await _exchange(http, sec, _form("e" * 70_000))
    assert status == 413
    _never_cached(headers)


@pytest.mark.parametrize("content_type", [
    "multipart/form-data; boundary=xyz", "application/json", "text/plain",
    "application/x-www-form-urlencoded-evil", "application/octet-stream",
])
async def test_a_form_in_another_media_type_is_refused(sec, http, vault, content_type):
    body = urlencode(_form(sec.token("i-tx-media"))).encode()
    if content_type.startswith("multipart"):
        body = b"".join(
            b'--xyz\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
            % (k.encode(), v.encode()) for k, v in _form(sec.token("i-tx-media")).items()
        ) + b"--xyz--\r\n"
    await _assert_refused(http, sec, vault, body, code="unsupported_media_type",
                          content_type=content_type)


async def test_a_form_that_is_not_utf8_is_refused_whatever_its_charset(sec, http, vault):
    body = urlencode(_form(sec.token("i-tx-latin1"), role="dev-cert")).encode() + b"&x=\xe9"
    await _assert_refused(http, sec, vault, body, code="malformed_form",
                          content_type=f"{FORM}; charset=iso-8859-1")


async def test_a_compressed_body_is_bounded_after_decompression(sec, http, vault):
    """A small gzip body that inflates past the limit is 413, not read into memory whole."""
    bomb = gzip.compress(b"scope=" + b"a" * 4_000_000)
    before = (sec.store_snapshot(), vault.snapshot())
    async with http.post(f"{sec.url}/v1/token", data=bomb,
                         headers={"Content-Type": FORM, "Content-Encoding": "gzip"}) as resp:
        assert resp.status == 413
        _never_cached(resp.headers)
    assert (sec.store_snapshot(), vault.snapshot()) == before


async def test_the_subject_token_comes_from_the_form_only(sec, http, vault):
    good = sec.token("i-tx-header")
    # A valid bearer header is not a subject token.
    form = {k: v for k, v in _form(good).items() if k != "subject_token"}
    before = (sec.store_snapshot(), vault.snapshot())
    async with http.post(f"{sec.url}/v1/token", data=form,
                         headers={"Authorization": f"Bearer {good}"}) as resp:
        body = await resp.json()
        assert (resp.status, body["broker_error"]) == (400, "missing_parameter")
    # Nor is one in the query string.
    async with http.post(f"{sec.url}/v1/token?subject_token={good}", data=form) as resp:
        assert (resp.status, (await resp.json())["broker_error"]) == (400, "missing_parameter")
    assert (sec.store_snapshot(), vault.snapshot()) == before
    # A valid header does not rescue a forged subject token.
    async with http.post(f"{sec.url}/v1/token", data=_form(good[:-4] + "AAAA"),
                         headers={"Authorization": f"Bearer {good}"}) as resp:
        assert (resp.status, (await resp.json())["error"]) == (400, "invalid_request")
    assert (sec.store_snapshot(), vault.snapshot()) == before


async def test_a_requested_token_type_cannot_tell_a_permitted_role_from_an_unknown_one(
        sec, http, vault):
    """``requested_token_type`` naming another kind must not answer differently for a role
    the subject may have than for one that does not exist: else a caller (a locked workload
    too, whose every exchange is refused) lists the roles policy gives it and their kinds."""
    async with http.post(f"{sec.url}/v1/admin/locks", headers=sec.admin(),
                         json={"kind": "workload", "value": "payments",
                               "reason": "token door review"}) as resp:
        assert resp.status == 201, await resp.text()
    wrong = BROKER_TOKEN_TYPE + "database_login"  # dev-cert issues x509_certificate
    answers = []
    for role in ("dev-cert", "no-such-role"):
        before = (sec.store_snapshot(), vault.snapshot())
        status, raw, headers = await _exchange(
            http, sec, _form(sec.token("i-tx-kind"), role, requested_token_type=wrong))
        assert (sec.store_snapshot(), vault.snapshot()) == before
        answers.append((status, raw, headers["Cache-Control"], headers["Pragma"]))
    assert len(set(answers)) == 1, answers
    assert json.loads(answers[0][1])["error_description"] == TARGET_REFUSED


async def test_a_subject_token_type_does_not_change_what_is_verified(sec, http, vault, issuer):
    """``id_token``/``access_token`` as subject_token_type verify the same identity JWT; a
    token from another issuer is refused whatever type it claims to be."""
    for token_type in (oauth.ID_TOKEN, oauth.ACCESS_TOKEN):
        form = {**_form(sec.token("i-tx-type")), "subject_token_type": token_type}
        status, _, _ = await _exchange(http, sec, form)
        assert status == 200
    forged = {**_form("eyJhbGciOiJub25lIn0.eyJpc3MiOiJ4In0."), "subject_token_type": JWT,
              "grant_type": GRANT_TYPE}
    status, raw, _ = await _exchange(http, sec, forged)
    assert (status, json.loads(raw)["error"]) == (400, "invalid_request")


async def test_a_role_this_door_cannot_serve_answers_as_an_unknown_one(make_broker, http,
                                                                       vault):
    """A role that needs a caller parameter (a PKI ``sign`` role's CSR) is never served here;
    its refusal must not differ from an unknown role's, or a workload (a locked one too:
    the parameters are checked before the lock) tells the roles it may have by it."""
    b = await make_broker(extra_roles={"dev-sign": {
        "engine": "pki", "mode": "sign", "mount": "pki", "vault_role": "dev-cert",
        "default_ttl": "10m", "max_ttl": "1h",
        "params": {"common_name": "{workload}.workload.internal"}}})
    async with http.post(f"{b.url}/v1/admin/locks", headers=b.admin(),
                         json={"kind": "workload", "value": "payments",
                               "reason": "token door review"}) as resp:
        assert resp.status == 201, await resp.text()
    answers = []
    for role in ("dev-sign", "no-such-role"):
        before = (b.store_snapshot(), vault.snapshot())
        status, raw, headers = await _exchange(http, b, _form(b.token("i-tx-sign"), role))
        assert (b.store_snapshot(), vault.snapshot()) == before
        answers.append((status, raw, headers["Cache-Control"], headers["Pragma"]))
    assert len(set(answers)) == 1, answers
    assert json.loads(answers[0][1])["error"] == "invalid_target"
