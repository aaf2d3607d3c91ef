"""A token id (jti) is good for one exchange, across replicas, and a refused request
does not use it up."""

from __future__ import annotations

import jwt
import pytest


def identity_cfg(issuer, replay: str) -> dict:
    return {"audience": issuer.audience, "issuers": [{
        "name": "dev", "issuer": issuer.issuer,
        "jwks_uri": f"{issuer.issuer}/.well-known/jwks.json", "algorithms": ["ES256"],
        "instance_claim": "instance_id", "workload_claim": "workload", "replay": replay}]}


async def _post(http, b, token, role="dev-cert"):
    async with http.post(f"{b.url}/v1/credentials", json={"role": role},
                         headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, await resp.json()


async def test_a_token_is_good_for_one_exchange_on_every_replica(make_broker, http, issuer,
                                                                 vault, pg):
    a = await make_broker(overrides={"identity": identity_cfg(issuer, "jti_once")})
    # A second replica on the same PostgreSQL store.
    b = await make_broker(store_url=a.store_url,
                          overrides={"identity": identity_cfg(issuer, "jti_once")})
    token = issuer.mint(instance="i-replay", workload="payments")
    status, cred = await _post(http, a, token)
    assert status == 201

    for replica in (a, b):
        before = (a.store_snapshot(), vault.snapshot())
        status, body = await _post(http, replica, token)
        assert (status, body["error"]["code"]) == (401, "token_replayed")
        assert (a.store_snapshot(), vault.snapshot()) == before

    # Renew and release do not mint anything and do not consume the token.
    async with http.delete(f"{a.url}/v1/leases/{cred['lease_id']}",
                           headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 204
    [seen] = a.rows("seen_tokens")
    assert seen["issuer_name"] == "dev"
    assert seen["jti"] == jwt.decode(token, options={"verify_signature": False})["jti"]


async def test_require_jti_refuses_a_token_without_one(make_broker, http, issuer, vault):
    b = await make_broker(overrides={"identity": identity_cfg(issuer, "require_jti_once")})
    token = issuer.mint(instance="i-nojti", workload="payments", claims={"jti": None})
    before = (b.store_snapshot(), vault.snapshot())
    status, body = await _post(http, b, token)
    assert (status, body["error"]["code"]) == (401, "token_missing_claim")
    assert "jti" in body["error"]["message"]
    assert (b.store_snapshot(), vault.snapshot()) == before


@pytest.mark.parametrize("replay", ["jti_once", "off"])
async def test_a_token_without_jti_or_with_replay_off_is_not_recorded(make_broker, http, issuer,
                                                                       replay):
    b = await make_broker(overrides={"identity": identity_cfg(issuer, replay)})
    claims = {"jti": None} if replay == "jti_once" else {}
    token = issuer.mint(instance=f"i-{replay}", workload="payments", claims=claims)
    assert (await _post(http, b, token))[0] == 201
    assert (await _post(http, b, token))[0] == 201
    assert b.rows("seen_tokens") == []


async def test_a_definite_vault_refusal_gives_the_token_back(make_broker, http, issuer):
    b = await make_broker(overrides={
        "identity": identity_cfg(issuer, "jti_once"),
        "roles": {
            "dev-cert": {"engine": "pki", "mount": "pki", "vault_role": "dev-cert",
                         "params": {"common_name": "{workload}.workload.internal"}},
            # The instance token's policy does not cover this Vault role: Vault says 403.
            "not-in-vault": {"engine": "pki", "mount": "pki", "vault_role": "missing",
                             "params": {"common_name": "{workload}.workload.internal"}},
        },
        "policy": {"rules": [{"name": "all", "allow": ["dev-cert", "not-in-vault"]}]},
    })
    token = issuer.mint(instance="i-giveback", workload="payments")
    status, body = await _post(http, b, token, role="not-in-vault")
    assert (status, body["error"]["code"]) == (502, "vault_permission_denied")
    assert b.rows("seen_tokens") == []
    assert [x["state"] for x in b.rows("leases")] == ["failed"]
    status, _ = await _post(http, b, token, role="dev-cert")
    assert status == 201
    assert len(b.rows("seen_tokens")) == 1
