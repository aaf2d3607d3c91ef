"""The broker's own Vault identity against the real OpenBao: a JWT login from a token file
(OpenBao's jwt auth trusting the dev issuer on loopback, as it would trust a Kubernetes
cluster's service-account issuer), logging in again with the file's newest token, the
start-up check of a static token (a wrong one stops ``broker serve`` with one line, a
missing capability is named), /readyz when Vault no longer accepts the broker's token, and
a 403's message naming whose policy refused which path."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from broker.dev.environment import dev_settings_dict
from broker.leases.migrations import migrate
from broker.vault.bootstrap import BROKER_POLICY, broker_policy
from tests.conftest import ADMIN_SHA
from tests.harness.vault import VaultProbe
from tests.harness.wait import eventually

SUBJECT = "system:serviceaccount:broker:broker"
AUDIENCE = "openbao"


def own_token(b: Any) -> Any:
    return b.broker.components.vault.own


def lookup_self(vault: VaultProbe, token: str) -> tuple[int, Any]:
    return VaultProbe(vault.addr, token).call("GET", "auth/token/lookup-self")


def token_for(vault: VaultProbe, policies: list[str], **extra: Any) -> str:
    status, body = vault.call("POST", "auth/token/create",
                              {"policies": policies, "ttl": "1h", "no_parent": True, **extra})
    assert status == 200, body
    return str(body["auth"]["client_token"])


@pytest.fixture(scope="module")
async def jwt_mount(vault: VaultProbe, vault_setup, issuer) -> AsyncIterator[str]:
    """A jwt auth mount of its own that trusts the dev issuer's JWKS, with a role bound
    to one subject and audience, giving the broker's policy for a short TTL. (Called from
    a thread: OpenBao fetches the JWKS from the issuer this event loop serves.)"""
    mount = "jwt-" + secrets.token_hex(4)
    assert vault.call("POST", f"sys/auth/{mount}", {"type": "jwt"})[0] == 204
    status, body = await asyncio.to_thread(vault.call, "POST", f"auth/{mount}/config", {
        "jwks_url": f"{issuer.issuer}/.well-known/jwks.json", "bound_issuer": issuer.issuer,
        "jwt_supported_algs": ["ES256"]})
    assert status == 204, body
    status, body = vault.call("POST", f"auth/{mount}/role/broker", {
        "role_type": "jwt", "user_claim": "sub", "bound_subject": SUBJECT,
        "bound_audiences": [AUDIENCE], "claim_mappings": {"jti": "jti"},
        "token_policies": [BROKER_POLICY], "token_ttl": "9s", "token_max_ttl": "9s"})
    assert status == 204, body
    yield mount
    await asyncio.to_thread(vault.call, "DELETE", f"sys/auth/{mount}")


def service_account_jwt(issuer: Any, *, subject: str = SUBJECT) -> str:
    return issuer.mint(instance="broker-pod", workload="broker", ttl=600,
                       claims={"sub": subject, "aud": AUDIENCE})


async def test_the_broker_logs_in_with_a_jwt_from_a_file_and_again_with_the_newest(
        make_broker, http, vault, bao, issuer, jwt_mount, tmp_path):
    token_file = tmp_path / "vault-token"
    first = service_account_jwt(issuer)
    token_file.write_text(first)
    auth = {"method": "jwt", "role": "broker", "mount": jwt_mount, "token_path": str(token_file)}
    b = await make_broker(overrides={"vault": {
        "addr": bao.addr, "token_role": "broker-instance",
        "instance_policies": ["broker-instance"], "auth": auth}})
    own = own_token(b)
    logged_in = own.token.reveal()
    status, body = lookup_self(vault, logged_in)
    assert status == 200 and body["data"]["meta"]["jti"] == issuer_jti(first)
    async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-cert"},
                         headers={"Authorization": f"Bearer {b.token('i-jwt-login')}"}) as r:
        assert r.status == 201, await r.text()

    async with http.get(f"{b.url}/metrics") as r:
        text = await r.text()
    [left] = [line.split()[1] for line in text.splitlines()
              if line.startswith("broker_vault_token_expires_seconds ")]
    assert 0 < float(left) <= 9

    # The projected token rotates: the next login (at 2/3 of the 9 s TTL) reads the new one.
    second = service_account_jwt(issuer)
    token_file.write_text(second)

    async def relogged() -> bool:
        await own.maintain()
        return own.token.reveal() != logged_in

    await eventually(relogged, "the broker logged in again before its token's TTL ran out")
    status, body = lookup_self(vault, own.token.reveal())
    assert status == 200 and body["data"]["meta"]["jti"] == issuer_jti(second)
    async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-cert"},
                         headers={"Authorization": f"Bearer {b.token('i-jwt-relogin')}"}) as r:
        assert r.status == 201, await r.text()


async def test_a_login_vault_no_longer_accepts_is_replaced_at_once(
        make_broker, http, vault, bao, issuer, jwt_mount, tmp_path):
    """The broker's login token revoked in Vault: the refused call makes readiness look it
    up, and a login method logs in again there and then instead of failing every exchange
    until the next renewal."""
    token_file = tmp_path / "vault-token"
    token_file.write_text(service_account_jwt(issuer))
    auth = {"method": "jwt", "role": "broker", "mount": jwt_mount, "token_path": str(token_file)}
    b = await make_broker(overrides={"vault": {"addr": bao.addr, "auth": auth}})
    own = own_token(b)
    first = own.token.reveal()
    assert vault.call("POST", "auth/token/revoke", {"token": first})[0] == 204
    async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-cert"},
                         headers={"Authorization": f"Bearer {b.token('i-relogin-1')}"}) as r:
        assert (r.status, (await r.json())["error"]["code"]) == (502, "vault_permission_denied")

    async def ready_again() -> bool:
        async with http.get(f"{b.url}/readyz") as resp:
            return resp.status == 200 and own.token.reveal() != first

    await eventually(ready_again, "the broker logged in again after its token was revoked")
    async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-cert"},
                         headers={"Authorization": f"Bearer {b.token('i-relogin-2')}"}) as r:
        assert r.status == 201, await r.text()


def issuer_jti(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


async def test_a_jwt_login_vault_refuses_or_a_missing_file_stops_start_up_saying_why(
        make_broker, bao, issuer, jwt_mount, tmp_path):
    from broker.errors import ConfigError, UpstreamRejected

    def cfg(path: Path) -> dict[str, Any]:
        return {"vault": {"addr": bao.addr, "auth": {
            "method": "jwt", "role": "broker", "mount": jwt_mount, "token_path": str(path)}}}

    wrong = tmp_path / "wrong-subject"
    wrong.write_text(service_account_jwt(issuer, subject="system:serviceaccount:x:y"))
    with pytest.raises(UpstreamRejected) as refused:
        await make_broker(overrides=cfg(wrong))
    assert refused.value.message.startswith(
        f"Vault refused the broker's login (auth method jwt at {jwt_mount}, Vault {bao.addr})")
    with pytest.raises(ConfigError) as missing:
        await make_broker(overrides=cfg(tmp_path / "absent"))
    assert str(missing.value) == (f"vault.auth.token_path {tmp_path / 'absent'}: cannot read "
                                  "it (No such file or directory)")


def serve_once(tmp_path: Path, bao: Any, issuer: Any,
               token: str) -> subprocess.CompletedProcess[str]:
    store = f"sqlite:///{tmp_path / 'store.db'}"
    migrate(store)
    data = dev_settings_dict(
        vault_addr=bao.addr, broker_token="${TEST_BROKER_VAULT_TOKEN}", issuer=issuer.issuer,
        jwks_uri=f"{issuer.issuer}/.well-known/jwks.json", store_url=store,
        admin_token_sha256=ADMIN_SHA, with_database=False, port=0)
    config = tmp_path / "broker.yaml"
    config.write_text(yaml.safe_dump(data))
    return subprocess.run(
        [sys.executable, "-m", "broker.cli.main", "serve", "--config", str(config)],
        env={**os.environ, "TEST_BROKER_VAULT_TOKEN": token}, capture_output=True, text=True,
        timeout=120, stdin=subprocess.DEVNULL, check=False)


async def test_a_wrong_token_stops_broker_serve_with_one_line(bao, issuer, vault_setup,
                                                               tmp_path):
    wrong = "s." + secrets.token_urlsafe(18)
    done = await asyncio.to_thread(serve_once, tmp_path, bao, issuer, wrong)
    assert done.returncode == 1, done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert lines == [
        f"broker: Vault refused the broker's own token (auth method token, Vault {bao.addr}): "
        "it is wrong, expired or revoked (or its policies lack auth/token/lookup-self, which "
        "Vault's default policy grants) (vault_token_invalid)"], lines
    assert wrong not in done.stderr


async def test_a_token_without_a_capability_is_named_at_start_up(make_broker, vault, caplog):
    name = "broker-lacking-" + secrets.token_hex(4)
    policy = "\n".join(line for line in broker_policy().splitlines()
                       if "sys/leases/lookup/*" not in line and "auth/token/create/" not in line)
    assert vault.call("POST", f"sys/policies/acl/{name}", {"policy": policy})[0] == 204
    token = token_for(vault, [name])
    caplog.set_level(logging.WARNING, logger="broker.vault.identity")
    vault_cfg = {"addr": vault.addr, "auth": {"method": "token", "token": token}}
    await make_broker(overrides={"vault": vault_cfg})
    said = [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "broker.vault.identity"]
    assert said == [
        ("ERROR", "the broker's Vault token lacks update on auth/token/create/broker-instance: "
                  "it cannot create instance tokens"),
        ("WARNING", "the broker's Vault token lacks list+sudo on sys/leases/lookup/*: it "
                    "cannot list Vault's leases (reconcile)")]
    assert token not in caplog.text


async def test_readyz_fails_once_vault_no_longer_accepts_the_brokers_token(make_broker, http,
                                                                           vault, caplog):
    token = token_for(vault, [BROKER_POLICY])
    caplog.set_level(logging.INFO, logger="broker.vault.identity")
    b = await make_broker(overrides={"vault": {"addr": vault.addr,
                                               "auth": {"method": "token", "token": token}}})
    # The broker's policy has every capability it needs: the start-up check says nothing.
    assert [r for r in caplog.records if r.name == "broker.vault.identity"] == []
    async with http.get(f"{b.url}/readyz") as resp:
        assert resp.status == 200
    assert vault.call("POST", "auth/token/revoke", {"token": token})[0] == 204

    # The next exchange is refused (502) naming the broker's own policy and the path...
    async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-cert"},
                         headers={"Authorization": f"Bearer {b.token('i-revoked-own')}"}) as r:
        err = (await r.json())["error"]
    assert (r.status, err["code"]) == (502, "vault_permission_denied")
    assert err["message"] == ("Vault refused auth/token/create/broker-instance (permission "
                              "denied) to the broker's own token (its Vault policy)")

    # ...and readiness, asked again at once after that refusal, says why.
    async def not_ready() -> dict[str, Any] | None:
        async with http.get(f"{b.url}/readyz") as resp:
            return await resp.json() if resp.status == 503 else None

    body = await eventually(not_ready, "/readyz answers 503 once the broker's token is revoked")
    assert body["checks"] == {"store": "ok", "vault": "token_invalid"}
    assert body["error"]["code"] == "vault_token_invalid"
    assert token not in repr(body)


async def test_a_403_on_the_instance_token_names_the_instance_policies(make_broker, http,
                                                                       caplog):
    other = {"engine": "pki", "mount": "pki", "vault_role": "not-in-the-policy",
             "default_ttl": "10m", "max_ttl": "1h",
             "params": {"common_name": "{workload}.workload.internal"}}
    b = await make_broker(extra_roles={"other-cert": other})
    caplog.set_level(logging.WARNING, logger="broker.vault.client")
    async with http.post(f"{b.url}/v1/credentials", json={"role": "other-cert"},
                         headers={"Authorization": f"Bearer {b.token('i-403')}"}) as r:
        err = (await r.json())["error"]
    assert (r.status, err["code"]) == (502, "vault_permission_denied")
    assert err["message"] == ("Vault refused pki/issue/not-in-the-policy (permission denied) "
                              "to the instance token (vault.instance_policies: broker-instance)")
    [line] = [r for r in caplog.records if r.getMessage() == "vault denied a call"]
    assert (line.vault_path, line.policy_of) == ("pki/issue/not-in-the-policy", "instance")


async def test_a_renewable_static_token_is_renewed_and_reported_once_it_cannot_be(
        make_broker, vault, caplog):
    """A 9 s renewable token with a 14 s explicit max: renewed at 2/3 of what is left
    until renewing no longer extends it, then reported as expiring."""
    token = token_for(vault, [BROKER_POLICY], ttl="9s", renewable=True, explicit_max_ttl="14s")
    b = await make_broker(overrides={"vault": {"addr": vault.addr,
                                               "auth": {"method": "token", "token": token}}})
    own = own_token(b)
    caplog.set_level(logging.WARNING, logger="broker.vault.identity")

    async def renewed() -> bool:
        await own.maintain()
        status, body = lookup_self(vault, token)
        return status == 200 and bool(body["data"].get("last_renewal_time"))

    await eventually(renewed, "the broker renewed its token before its TTL ran out", 20, 0.2)

    async def reported() -> bool:
        await own.maintain()
        return any("expires soon and cannot be renewed" in r.getMessage()
                   for r in caplog.records)

    await eventually(reported, "the broker reported its token nearing its max TTL", 20, 0.2)
    assert token not in caplog.text
