"""The oidc engine on a real OpenBao: the broker hands an instance the OIDC token OpenBao's
identity engine signs for its workload's entity (the ``dev-oidc`` role ``bootstrap_dev``
sets up, as ``broker dev`` does), and the token verifies with PyJWT against the JWKS
OpenBao publishes, fetched over loopback as a cloud would: signature, ``aud`` (the role's
client_id), ``sub`` (the entity of the instance's token), ``iss`` and ``exp`` (the
credential's expires_at). A workload the policy does not allow the role is refused with
nothing recorded; termination revokes the instance token (no further token can be read)
and records the token ``delivered``, not revoked: a JWT cannot be recalled."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest

from broker.vault.bootstrap import OIDC_ROLE
from tests.harness.api import issue, terminate
from tests.integration.test_cli import run
from tests.integration.test_dev_fresh import start_dev

TABLES = ("instances", "instance_tokens", "leases", "revocation_jobs", "audit_events")
ROLE = {
    "engine": "oidc",
    "mount": "identity",
    "vault_role": OIDC_ROLE,
    "default_ttl": "5m",
    "max_ttl": "5m",
    "max_leases_per_instance": 1,  # a delivered token does not count against it
    "on_limit": "refuse",
}


async def oidc_broker(make_broker, bao, vault_setup, **role: Any):
    """The dev settings plus the ``dev-oidc`` role for the ``payments`` workload only, and
    instance tokens with one entity per workload."""
    return await make_broker(
        extra_roles={"dev-oidc": {**ROLE, **role}},
        overrides={
            "vault": {
                "addr": bao.addr,
                "auth": {"method": "token", "token": vault_setup.broker_token},
                "instance_policies": ["broker-instance"],
                "entity_alias": "workload",
            },
            "policy": {
                "rules": [
                    {
                        "name": "payments",
                        "issuer": "dev",
                        "match": [{"identity": "workload", "regex": "payments"}],
                        "allow": ["dev-cert", "dev-oidc"],
                    },
                    {
                        "name": "others",
                        "issuer": "dev",
                        "match": [{"identity": "workload", "regex": "[a-z0-9-]{1,63}"}],
                        "allow": ["dev-cert"],
                    },
                ]
            },
        },
    )


async def published_keys(http, bao) -> jwt.PyJWKSet:
    async with http.get(f"{bao.addr}/v1/identity/oidc/.well-known/keys") as resp:
        assert resp.status == 200, await resp.text()
        return jwt.PyJWKSet.from_dict(await resp.json())


def verified(token: str, keys: jwt.PyJWKSet, audience: str, issuer: str) -> dict[str, Any]:
    kid = jwt.get_unverified_header(token)["kid"]
    [key] = [k for k in keys.keys if k.key_id == kid]
    return jwt.decode(
        token,
        key.key,
        algorithms=["RS256"],
        audience=audience,
        issuer=issuer,
        options={"require": ["aud", "sub", "iss", "exp", "iat"]},
    )


def entity_of(vault, accessor: str) -> str:
    status, body = vault.call("POST", "auth/token/lookup-accessor", {"accessor": accessor})
    assert status == 200, body
    entity = body["data"]["entity_id"]
    assert entity
    return str(entity)


async def test_an_instance_gets_a_token_that_verifies_against_openbaos_jwks(
    make_broker, bao, vault, vault_setup, http
):
    b = await oidc_broker(make_broker, bao, vault_setup)
    oidc = vault_setup.oidc

    status, cred = await issue(http, b, "i-oidc-a", "dev-oidc")
    assert status == 201, cred
    assert set(cred) == {
        "lease_id",
        "instance_id",
        "workload",
        "role",
        "kind",
        "data",
        "issued_at",
        "expires_at",
        "renewable",
        "leased",
    }
    assert (cred["kind"], cred["role"], cred["renewable"], cred["leased"]) == (
        "oidc_token",
        "dev-oidc",
        False,
        False,
    )
    data = cred["data"]
    assert set(data) == {"token", "audience", "subject", "issuer"}

    keys = await published_keys(http, bao)
    claims = verified(data["token"], keys, oidc.client_id, oidc.issuer)
    [tok] = [t for t in b.rows("instance_tokens") if t["instance_id"] == "i-oidc-a"]
    entity = entity_of(vault, tok["accessor"])
    assert (claims["aud"], claims["sub"], claims["iss"]) == (oidc.client_id, entity, oidc.issuer)
    assert (data["audience"], data["subject"], data["issuer"]) == (
        oidc.client_id,
        entity,
        oidc.issuer,
    )
    assert datetime.fromisoformat(cred["expires_at"]) == datetime.fromtimestamp(claims["exp"], UTC)
    assert claims["exp"] - claims["iat"] == 300  # the OpenBao role's ttl

    # Claims OpenBao did not sign do not verify: the JWKS is what is checked.
    header, _, signature = data["token"].split(".")
    other_sub = json.dumps({**claims, "sub": "another-entity"}).encode()
    payload = base64.urlsafe_b64encode(other_sub).rstrip(b"=").decode()
    with pytest.raises(jwt.InvalidSignatureError):
        verified(f"{header}.{payload}.{signature}", keys, oidc.client_id, oidc.issuer)
    with pytest.raises(jwt.InvalidAudienceError):
        verified(data["token"], keys, "another-audience", oidc.issuer)

    # The same workload's next instance has the same entity (one per workload, a stable
    # ``sub`` a cloud's trust policy can pin); the second token of one instance is not
    # held back by the role's limit of one: nothing here holds a Vault lease.
    status, again = await issue(http, b, "i-oidc-a", "dev-oidc")
    assert status == 201, again
    status, other = await issue(http, b, "i-oidc-b", "dev-oidc")
    assert status == 201, other
    assert verified(other["data"]["token"], keys, oidc.client_id, oidc.issuer)["sub"] == entity

    leases = {row["lease_id"]: row for row in b.rows("leases")}
    assert len(leases) == 3
    for row in leases.values():
        assert (
            row["role"],
            row["kind"],
            row["state"],
            row["vault_lease_id"],
            row["renewable"],
            row["error_code"],
            row["vault_path"],
        ) == (
            "dev-oidc",
            "oidc_token",
            "delivered",
            None,
            False,
            None,
            f"identity/oidc/token/{OIDC_ROLE}",
        )
        assert row["token_accessor"]  # read with the instance's token
    assert leases[cred["lease_id"]]["expires_at"].replace(tzinfo=UTC) == datetime.fromtimestamp(
        claims["exp"], UTC
    )
    dump = repr([b.rows(t) for t in TABLES])
    for token in (data["token"], again["data"]["token"], other["data"]["token"]):
        assert token.split(".")[2] not in dump


async def test_a_workload_not_allowed_the_role_is_refused_and_nothing_is_recorded(
    make_broker, bao, vault, vault_setup, http
):
    b = await oidc_broker(make_broker, bao, vault_setup)
    before = (b.store_snapshot(), vault.token_accessors())
    status, body = await issue(http, b, "i-oidc-orders", "dev-oidc", workload="orders")
    assert (status, body) == (
        403,
        {
            "error": {
                "code": "role_not_permitted",
                "message": "role 'dev-oidc' is not permitted for this identity",
            }
        },
    )
    after = b.store_snapshot()
    assert after["leases"] == before[0]["leases"] and after["instance_tokens"] == 0
    assert vault.token_accessors() == before[1]  # no instance token, so no entity read


async def test_a_token_outliving_the_roles_max_ttl_is_refused(make_broker, bao, vault_setup, http):
    b = await oidc_broker(make_broker, bao, vault_setup, default_ttl="4m", max_ttl="4m")
    status, body = await issue(http, b, "i-oidc-long", "dev-oidc")
    assert (status, body["error"]["code"]) == (502, "vault_bad_response"), body
    assert "longer than the role's max_ttl of 240s" in body["error"]["message"]
    assert "eyJ" not in body["error"]["message"]
    [row] = b.rows("leases")
    assert (row["state"], row["vault_lease_id"], row["error_code"]) == (
        "failed",
        None,
        "vault_bad_response",
    )


async def test_termination_ends_the_instance_token_and_records_the_jwt_delivered(
    make_broker, bao, vault, vault_setup, http
):
    b = await oidc_broker(make_broker, bao, vault_setup)
    oidc = vault_setup.oidc
    status, cred = await issue(http, b, "i-oidc-end", "dev-oidc")
    assert status == 201, cred
    status, cert = await issue(http, b, "i-oidc-end", "dev-cert")
    assert status == 201, cert
    [tok] = [t for t in b.rows("instance_tokens") if t["instance_id"] == "i-oidc-end"]
    assert vault.accessor_alive(tok["accessor"])

    shown = await terminate(http, b, "i-oidc-end")
    assert (shown["state"], shown["job"]["state"]) == ("terminated", "done")
    states = {x["role"]: x["state"] for x in shown["leases"]}
    # The certificate's lease is revoked in Vault; the JWT is only recorded as handed out.
    assert states == {"dev-oidc": "delivered", "dev-cert": "revoked"}
    # The instance token is gone: no further OIDC token can be read with it.
    assert not vault.accessor_alive(tok["accessor"])
    status, body = await issue(http, b, "i-oidc-end", "dev-oidc")
    assert (status, body["error"]["code"]) == (409, "instance_terminated")
    # What was handed out stays valid until its exp: a JWT cannot be recalled.
    keys = await published_keys(http, bao)
    claims = verified(cred["data"]["token"], keys, oidc.client_id, oidc.issuer)
    assert datetime.fromtimestamp(claims["exp"], UTC) == datetime.fromisoformat(cred["expires_at"])
    # The audit trail records the token issued and delivered, and never says it was
    # revoked: the revocation lists the certificate's lease only.
    events = b.rows("audit_events")
    [issued] = [e for e in events if e["lease_id"] == cred["lease_id"]]
    assert (issued["action"], issued["detail"]["state"], issued["detail"]["engine"]) == (
        "lease.issued",
        "delivered",
        "oidc",
    )
    [revoked] = [e for e in events if e["action"] == "leases.revoked"]
    assert revoked["detail"]["lease_ids"] == [cert["lease_id"]]


async def test_broker_dev_issues_dev_oidc_and_names_its_jwks(tmp_path, pg, http):
    """``broker dev`` as a user starts it: the walk-through names dev-oidc, its audience,
    issuer and JWKS URL, and the token it issues verifies against that JWKS."""
    d = tmp_path / "dev"
    proc, env = await start_dev(d, pg)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while not lines or not lines[-1].startswith("Ctrl-C stops"):
            lines.append((await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip())
            assert len(lines) < 100, lines
        text = "\n".join(lines)
        jwks_url = f"{env['VAULT_ADDR']}/v1/identity/oidc/.well-known/keys"
        assert "dev-oidc : an OIDC token (JWT)" in text and jwks_url in text, text
        audience = text.split("aud ", 1)[1].split(",", 1)[0]
        issuer = f"{env['VAULT_ADDR']}/v1/identity/oidc"

        code, token, _ = await run(
            "broker.cli.main",
            "dev",
            "token",
            "--dir",
            str(d),
            "--instance",
            "i-dev-oidc",
            "--workload",
            "payments",
        )
        assert code == 0
        async with http.post(
            f"{env['BROKER_URL']}/v1/credentials",
            json={"role": "dev-oidc"},
            headers={"Authorization": f"Bearer {token.strip()}"},
        ) as resp:
            assert resp.status == 201, await resp.text()
            cred = await resp.json()
        async with http.get(jwks_url) as resp:
            keys = jwt.PyJWKSet.from_dict(await resp.json())
        claims = verified(cred["data"]["token"], keys, audience, issuer)
        assert (cred["kind"], cred["data"]["subject"]) == ("oidc_token", claims["sub"])
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0
