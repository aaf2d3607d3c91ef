"""Refusals at the token-exchange door (``POST /v1/token``), as an attacker would try them:
every token attack of the refusal suites (test_refusals.py, test_attacks_http.py), sent as
``subject_token``, is ``400 invalid_request`` with the verifier's own code in
``broker_error``, and changes nothing in the lease store or in Vault. An unknown role, a
refused one and a locked one get byte-identical answers, so roles cannot be probed."""

from __future__ import annotations

import json
import logging
import time
from typing import Any
from urllib.parse import urlencode

import pytest

from broker.api.oauth import GRANT_TYPE, JWT, TARGET_REFUSED
from broker.logs import JsonFormatter
from tests.security.test_attacks_http import CASES, atk, lab_env  # noqa: F401 (fixtures)
from tests.security.test_refusals import _token_cases
from tests.security.test_replay import identity_cfg


async def _exchange(http: Any, b: Any, form: dict[str, str] | bytes, *,
                    content_type: str | None = None) -> tuple[int, bytes, Any]:
    headers = {"Content-Type": content_type} if content_type else {}
    async with http.post(f"{b.url}/v1/token", data=form, headers=headers) as resp:
        return resp.status, await resp.read(), resp.headers


def _form(subject_token: str, role: str = "dev-cert", **extra: str) -> dict[str, str]:
    return {"grant_type": GRANT_TYPE, "subject_token": subject_token,
            "subject_token_type": JWT, "audience": role, **extra}


async def _assert_refused(http: Any, b: Any, vault: Any, form: dict[str, str] | bytes, *,
                          status: int = 400, error: str = "invalid_request", code: str,
                          content_type: str | None = None) -> dict[str, Any]:
    """Refused with an OAuth error body and no-store, and nothing changed."""
    before = (b.store_snapshot(), vault.snapshot())
    got, raw, headers = await _exchange(http, b, form, content_type=content_type)
    body = json.loads(raw)
    assert (got, body.get("error"), body.get("broker_error")) == (status, error, code), body
    assert set(body) == {"error", "error_description", "broker_error"}
    assert headers["Cache-Control"] == "no-store"
    assert headers["Content-Type"].startswith("application/json")
    assert (b.store_snapshot(), vault.snapshot()) == before
    return body


@pytest.fixture
async def sec(make_broker):
    return await make_broker()


async def test_each_forged_or_invalid_subject_token_is_refused_and_changes_nothing(
        sec, http, vault, issuer):
    for name, token, code in _token_cases(issuer):
        body = await _assert_refused(http, sec, vault, _form(token), code=code)
        assert token[:40] not in body["error_description"], name


@pytest.mark.parametrize(("build", "code"), [(b, c) for _, b, c in CASES],
                         ids=[name for name, _, _ in CASES])
async def test_each_token_attack_as_subject_token_changes_nothing(
        build, code, atk, lab_env, http, vault):  # noqa: F811
    await _assert_refused(http, atk, vault, _form(build(lab_env)), code=code)


async def test_a_replayed_subject_token_is_refused_at_either_door(make_broker, http, vault,
                                                                  issuer):
    b = await make_broker(overrides={"identity": identity_cfg(issuer, "jti_once")})
    token = issuer.mint(instance="i-tx-replay", workload="payments")
    status, _, _ = await _exchange(http, b, _form(token))
    assert status == 200
    await _assert_refused(http, b, vault, _form(token), code="token_replayed")
    # One replay record for both doors: used here, refused at /v1/credentials too, and the
    # other way round.
    async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-cert"},
                         headers={"Authorization": f"Bearer {token}"}) as resp:
        assert (resp.status, (await resp.json())["error"]["code"]) == (401, "token_replayed")
    other = issuer.mint(instance="i-tx-replay", workload="payments")
    async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-cert"},
                         headers={"Authorization": f"Bearer {other}"}) as resp:
        assert resp.status == 201
    await _assert_refused(http, b, vault, _form(other), code="token_replayed")


async def test_an_oversized_subject_token_and_body(sec, http, vault):
    await _assert_refused(http, sec, vault, _form("e" * 20_000), code="token_too_large")
    await _assert_refused(http, sec, vault, _form("e" * 70_000), status=413,
                          code="payload_too_large")


async def test_unknown_refused_and_locked_roles_answer_byte_for_byte_the_same(sec, http,
                                                                             vault):
    async with http.post(f"{sec.url}/v1/admin/locks", headers=sec.admin(),
                         json={"kind": "role", "value": "dev-cert",
                               "reason": "token refusals test"}) as resp:
        assert resp.status == 201, await resp.text()
    answers = []
    for token, role in [
        (sec.token("i-tx-probe"), "no-such-role"),  # no such role
        (sec.token("i-tx-probe", workload="Not_Allowed"), "dev-db"),  # policy refuses
        (sec.token("i-tx-probe"), "dev-cert"),  # a lock refuses
        (sec.token("i-tx-probe"), "../sys/raw"),  # cannot be a role
        (sec.token("i-tx-probe"), "https://sts.example.org/dev-db"),
    ]:
        before = (sec.store_snapshot(), vault.snapshot())
        status, raw, headers = await _exchange(http, sec, _form(token, role))
        audited = sec.store_snapshot()["audit_events"] - before[0]["audit_events"]
        # A lock's refusal is audited (as at /v1/credentials); nothing else changes.
        assert ({**sec.store_snapshot(), "audit_events": 0}, vault.snapshot()) == (
            {**before[0], "audit_events": 0}, before[1])
        assert audited in (0, 1)
        answers.append((status, raw, headers["Cache-Control"], headers["Pragma"]))
    assert len(set(answers)) == 1, answers
    assert json.loads(answers[0][1]) == {"error": "invalid_target",
                                         "error_description": TARGET_REFUSED,
                                         "broker_error": "role_not_permitted"}
    assert answers[0][0] == 400


@pytest.mark.parametrize(("extra", "code"), [
    ({"actor_token": "eyJhbGciOiJFUzI1NiJ9.e30.sig", "actor_token_type": JWT},
     "actor_token_refused"),
    ({"actor_token_type": JWT}, "actor_token_refused"),
], ids=["actor_token", "actor_token_type_alone"])
async def test_an_actor_token_is_refused(sec, http, vault, extra, code):
    await _assert_refused(http, sec, vault, _form(sec.token("i-tx-actor"), **extra), code=code)


@pytest.mark.parametrize(("mutate", "error", "code"), [
    (lambda f: {k: v for k, v in f.items() if k != "grant_type"}, "invalid_request",
     "missing_parameter"),
    (lambda f: {**f, "grant_type": "client_credentials"}, "unsupported_grant_type",
     "unsupported_grant_type"),
    (lambda f: {k: v for k, v in f.items() if k != "subject_token"}, "invalid_request",
     "missing_parameter"),
    (lambda f: {**f, "subject_token_type": "urn:ietf:params:oauth:token-type:saml2"},
     "invalid_request", "unsupported_token_type"),
    (lambda f: {**f, "resource": "dev-db"}, "invalid_request", "conflicting_target"),
    (lambda f: [*f.items(), ("audience", "dev-cert")], "invalid_request", "repeated_parameter"),
    (lambda f: [*f.items(), ("subject_token", f["subject_token"])], "invalid_request",
     "repeated_parameter"),
], ids=["no_grant_type", "other_grant_type", "no_subject_token", "saml2_subject",
        "audience_and_resource_differ", "repeated_audience", "repeated_subject_token"])
async def test_a_malformed_exchange_is_refused_and_changes_nothing(sec, http, vault, mutate,
                                                                   error, code):
    form = mutate(_form(sec.token("i-tx-form")))
    if isinstance(form, list):
        form = urlencode(form).encode()
        await _assert_refused(http, sec, vault, form, error=error, code=code,
                              content_type="application/x-www-form-urlencoded")
    else:
        await _assert_refused(http, sec, vault, form, error=error, code=code)


async def test_a_json_body_is_refused(sec, http, vault):
    body = json.dumps(_form(sec.token("i-tx-json"))).encode()
    await _assert_refused(http, sec, vault, body, code="unsupported_media_type",
                          content_type="application/json")


async def test_an_expired_subject_token_says_why_without_quoting_it(sec, http, vault, issuer):
    token = issuer.mint(instance="i-tx-exp", workload="payments", now=time.time() - 900)
    body = await _assert_refused(http, sec, vault, _form(token), code="token_expired")
    assert body["error_description"] and token[:20] not in body["error_description"]


async def test_a_refusal_is_logged_and_counted_as_at_the_other_door(sec, http, vault, issuer,
                                                                    caplog):
    caplog.set_level(logging.INFO)
    token = issuer.mint(instance="i-tx-log", workload="payments", now=time.time() - 900)
    await _assert_refused(http, sec, vault, _form(token), code="token_expired")
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records
             if r.getMessage() == "request refused"]
    [line] = [x for x in lines if x.get("route") == "/v1/token"]
    assert {k: line.get(k) for k in ("route", "status", "code", "issuer", "level")} == {
        "route": "/v1/token", "status": 400, "code": "token_expired", "issuer": "dev",
        "level": "info"}
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert token not in text and token.split(".")[2] not in text
    async with http.get(f"{sec.url}/metrics") as resp:
        metrics = await resp.text()
    assert 'broker_requests_refused_total{code="token_expired",issuer="dev"} 1.0' in metrics
    assert 'broker_http_requests_total{method="POST",route="/v1/token",status="400"}' in metrics
