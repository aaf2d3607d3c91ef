"""RFC 8693 token exchange (``POST /v1/token``) on real components: the credential comes
from the same issuance as ``/v1/credentials`` (recorded, renewable and releasable by its
lease id, revoked on termination), counted and logged the same; and an unmodified
``google-auth`` external-account client gets its token and expiry from it."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from cryptography import x509

from broker.api.oauth import ACCESS_TOKEN, GRANT_TYPE, JWT
from broker.logs import JsonFormatter
from tests.harness.api import bearer, release, terminate

DB_TTL_S = 600  # dev-db's default_ttl: 10m
CERT_TTL_S = 600  # dev-cert's


def _login(pg: Any, user: str, password: str) -> str:
    with psycopg.connect(pg.url("postgres", user=user), password=password,
                         connect_timeout=5) as conn:
        return conn.execute("SELECT current_user").fetchone()[0]


async def exchange(http: Any, b: Any, subject_token: str, role: str,
                   **extra: str) -> tuple[int, Any, Any]:
    form = {"grant_type": GRANT_TYPE, "subject_token": subject_token,
            "subject_token_type": JWT, "audience": role, **extra}
    async with http.post(f"{b.url}/v1/token", data=form) as resp:
        return resp.status, await resp.json(), resp.headers


@pytest.fixture
async def db_broker(make_broker, vault_setup):
    if not vault_setup.database_configured:
        pytest.skip("needs the database engine (PostgreSQL on 127.0.0.1:5432)")
    return await make_broker()


def _lifetime_s(body: dict[str, Any]) -> float:
    expires = datetime.fromisoformat(body["expires_at"])
    return (expires - datetime.now(UTC)).total_seconds()


async def test_a_database_login_by_token_exchange_is_one_lease_like_any_other(
        db_broker, http, pg, vault, caplog):
    b = db_broker
    caplog.set_level(logging.INFO)
    token = b.token("i-tx-db")
    status, body, headers = await exchange(http, b, token, "dev-db")
    assert status == 200, body
    assert (headers["Cache-Control"], headers["Pragma"]) == ("no-store", "no-cache")
    assert headers["Content-Type"].startswith("application/json")
    assert set(body) == {"access_token", "issued_token_type", "token_type", "expires_in",
                         "lease_id", "renewable", "expires_at", "kind", "role", "username"}
    assert (body["issued_token_type"], body["token_type"], body["kind"], body["role"]) == (
        "urn:credential-broker:token-type:database_login", "N_A", "database_login", "dev-db")
    assert body["renewable"] is True
    assert type(body["expires_in"]) is int and DB_TTL_S - 5 <= body["expires_in"] <= DB_TTL_S
    assert abs(_lifetime_s(body) - body["expires_in"]) <= 5
    # The access token is the login's password: it works.
    assert _login(pg, body["username"], body["access_token"]) == body["username"]

    # Recorded as any lease, by the same issuance: the row, Vault's lease, the log line.
    [lease] = b.rows("leases")
    assert (lease["lease_id"], lease["state"], lease["role"]) == (body["lease_id"], "active",
                                                                  "dev-db")
    assert vault.lease_exists(lease["vault_lease_id"])
    [line] = [json.loads(JsonFormatter().format(r)) for r in caplog.records
              if r.getMessage() == "credential issued"]
    assert {k: line.get(k) for k in ("lease_id", "kind", "role", "instance_id", "workload")} == {
        "lease_id": body["lease_id"], "kind": "database_login", "role": "dev-db",
        "instance_id": "i-tx-db", "workload": "payments"}
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert body["access_token"] not in text and token not in text
    async with http.get(f"{b.url}/metrics") as resp:
        metrics = await resp.text()
    assert 'broker_credentials_issued_total{kind="database_login",role="dev-db"} 1.0' in metrics

    # Renewed and released through /v1/leases with the returned lease id.
    async with http.post(f"{b.url}/v1/leases/{body['lease_id']}/renew",
                         headers=bearer(token), json={"ttl": "5m"}) as resp:
        assert resp.status == 200, await resp.text()
    await release(http, b, "i-tx-db", body["lease_id"])
    assert [r["state"] for r in b.rows("leases")] == ["released"]
    assert not pg.role_exists(body["username"])

    # Termination revokes one issued by exchange.
    status, again, _ = await exchange(http, b, b.token("i-tx-db"), "dev-db")
    assert status == 200, again
    shown = await terminate(http, b, "i-tx-db")
    assert {x["lease_id"]: x["state"] for x in shown["leases"]}[again["lease_id"]] == "revoked"
    assert not pg.role_exists(again["username"])
    with pytest.raises(psycopg.OperationalError):
        _login(pg, again["username"], again["access_token"])
    status, body, _ = await exchange(http, b, b.token("i-tx-db"), "dev-db")
    assert (status, body["error"], body["broker_error"]) == (409, "invalid_request",
                                                             "instance_terminated")


async def test_a_certificate_by_token_exchange(make_broker, http, vault):
    b = await make_broker()
    status, body, headers = await exchange(http, b, b.token("i-tx-cert"), "dev-cert",
                                           resource="dev-cert", scope="unused please")
    assert status == 200, body
    assert headers["Cache-Control"] == "no-store"
    assert (body["issued_token_type"], body["token_type"], body["kind"]) == (
        "urn:credential-broker:token-type:x509_certificate", "N_A", "x509_certificate")
    cert = x509.load_pem_x509_certificate(body["access_token"].encode())
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == "payments.workload.internal"
    assert body["serial_number"] and body["private_key"].startswith("-----BEGIN")
    assert "certificate" not in body  # it is the access_token
    assert type(body["expires_in"]) is int and CERT_TTL_S - 5 <= body["expires_in"] <= CERT_TTL_S
    not_after = cert.not_valid_after_utc
    assert abs((not_after - datetime.now(UTC)) - timedelta(seconds=body["expires_in"])) <= \
        timedelta(seconds=65)  # Vault backdates not_before, not not_after; a minute of slack
    [lease] = b.rows("leases")
    assert (lease["lease_id"], lease["state"]) == (body["lease_id"], "active")


@pytest.mark.parametrize("requested", [ACCESS_TOKEN,
                                       "urn:credential-broker:token-type:x509_certificate"],
                         ids=["access_token", "own_type"])
async def test_the_requested_type_the_role_issues_is_served(make_broker, http, requested):
    b = await make_broker()
    status, body, _ = await exchange(http, b, b.token("i-tx-req"), "dev-cert",
                                     requested_token_type=requested)
    assert status == 200, body
    assert body["issued_token_type"] == "urn:credential-broker:token-type:x509_certificate"


async def test_another_requested_type_issues_nothing(make_broker, http, vault):
    b = await make_broker()
    before = (b.store_snapshot(), vault.snapshot())
    status, body, headers = await exchange(http, b, b.token("i-tx-other"), "dev-cert",
                                           requested_token_type=JWT)
    # The answer of an unknown role (roles cannot be probed by kind); the log says which.
    assert (status, body["error"], body["broker_error"]) == (
        400, "invalid_target", "role_not_permitted"), body
    assert headers["Cache-Control"] == "no-store"
    assert (b.store_snapshot(), vault.snapshot()) == before


# -- google-auth, unmodified ------------------------------------------------------------------


def _google_credentials(b: Any, role: str, token_file: Any) -> Any:
    from google.auth import identity_pool

    return identity_pool.Credentials.from_info({
        "type": "external_account",
        "audience": role,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": f"{b.url}/v1/token",
        "credential_source": {"file": str(token_file)},
    })


def _refresh(credentials: Any) -> None:
    import google.auth.transport.requests

    credentials.refresh(google.auth.transport.requests.Request())


async def test_google_auth_gets_the_credential_and_its_expiry(make_broker, http, tmp_path):
    pytest.importorskip("google.auth")
    b = await make_broker()
    token_file = tmp_path / "token"
    token_file.write_text(b.token("i-tx-google") + "\n")  # as `echo $TOKEN > file` writes it
    credentials = _google_credentials(b, "dev-cert", token_file)
    started = datetime.now(UTC)
    # google-auth is synchronous; the broker serves on this event loop.
    await asyncio.to_thread(_refresh, credentials)
    assert credentials.token.startswith("-----BEGIN CERTIFICATE-----")
    expiry = credentials.expiry.replace(tzinfo=UTC)  # google-auth keeps naive UTC
    assert abs((expiry - started).total_seconds() - CERT_TTL_S) <= 10
    [lease] = b.rows("leases")
    assert (lease["role"], lease["state"], lease["instance_id"]) == ("dev-cert", "active",
                                                                     "i-tx-google")


@pytest.mark.parametrize(("role", "token", "error", "code"), [
    ("no-such-role", "good", "invalid_target", "role_not_permitted"),
    ("dev-cert", "expired", "invalid_request", "token_expired"),
], ids=["unknown_role", "expired_token"])
async def test_a_refused_exchange_is_google_auths_own_oauth_error(make_broker, tmp_path, vault,
                                                                  role, token, error, code):
    pytest.importorskip("google.auth")
    from google.auth import exceptions

    b = await make_broker()
    token_file = tmp_path / "token"
    if token == "good":
        token_file.write_text(b.token("i-tx-google-no"))
    else:
        token_file.write_text(b.token("i-tx-google-no", now=time.time() - 900))
    before = (b.store_snapshot(), vault.snapshot())
    with pytest.raises(exceptions.OAuthError) as caught:
        await asyncio.to_thread(_refresh, _google_credentials(b, role, token_file))
    response = json.loads(caught.value.args[1])
    assert (response["error"], response["broker_error"]) == (error, code)
    assert f"Error code {error}" in caught.value.args[0]
    assert (b.store_snapshot(), vault.snapshot()) == before
