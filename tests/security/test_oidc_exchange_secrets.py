"""The OIDC token by token exchange, as a reviewer checks where secrets go: the JWT is in
the answer and nowhere else (no log line at any level, no lease, audit or token row), nor
is the subject token; the answer is a Bearer JWT that lives the role's TTL at most."""

from __future__ import annotations

import json
import logging
from urllib.parse import urlencode

from broker.api.oauth import ACCESS_TOKEN, GRANT_TYPE, JWT
from broker.logs import JsonFormatter
from tests.integration.engines.test_oidc import oidc_broker

TABLES = ("instances", "instance_tokens", "leases", "revocation_jobs", "audit_events")


async def test_the_jwt_and_the_subject_token_are_only_in_the_answer(make_broker, bao,
                                                                   vault_setup, http, caplog):
    caplog.set_level(logging.DEBUG)
    b = await oidc_broker(make_broker, bao, vault_setup)
    subject = b.token("i-oidc-tx")
    form = {"grant_type": GRANT_TYPE, "subject_token": subject, "subject_token_type": JWT,
            "audience": "dev-oidc", "requested_token_type": ACCESS_TOKEN}
    async with http.post(f"{b.url}/v1/token", data=urlencode(form),
                         headers={"Content-Type": "application/x-www-form-urlencoded"}) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        assert (resp.headers["Cache-Control"], resp.headers["Pragma"]) == ("no-store",
                                                                           "no-cache")
    assert (body["token_type"], body["issued_token_type"], body["kind"]) == (
        "Bearer", JWT, "oidc_token")
    assert 0 < body["expires_in"] <= 300
    jwt = body["access_token"]
    assert jwt.count(".") == 2
    secrets = [jwt, jwt.split(".")[2], subject, subject.split(".")[2]]
    logs = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    rows = repr([b.rows(t) for t in TABLES])
    for secret in secrets:
        assert secret not in logs
        assert secret not in rows
    async with http.get(f"{b.url}/metrics") as resp:
        metrics = await resp.text()
    assert not any(s in metrics for s in secrets)
    assert json.dumps(body).count(jwt) == 1  # the access_token, not repeated as a member
