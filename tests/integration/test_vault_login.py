"""The broker's own Vault identity (AppRole), and what it does when Vault is sealed."""

from __future__ import annotations

import asyncio

import pytest

from broker.errors import UpstreamRejected
from broker.vault.bootstrap import bootstrap_dev
from broker.vault.settings import AppRoleAuth
from tests.harness.ports import started_openbao
from tests.harness.vault import VaultProbe


@pytest.fixture(scope="module")
def approle(vault: VaultProbe, vault_setup) -> tuple[str, str]:
    status, body = vault.call("GET", "sys/auth")
    if "approle/" not in body["data"]:
        assert vault.call("POST", "sys/auth/approle", {"type": "approle"})[0] == 204
    assert vault.call("POST", "auth/approle/role/broker-test",
                      {"token_policies": ["broker"], "token_ttl": "1h"})[0] == 204
    _, role = vault.call("GET", "auth/approle/role/broker-test/role-id")
    _, secret = vault.call("POST", "auth/approle/role/broker-test/secret-id", {})
    return role["data"]["role_id"], secret["data"]["secret_id"]


async def test_broker_logs_in_with_approle_and_issues(make_broker, http, approle, vault, bao):
    role_id, secret_id = approle

    def vault_cfg(secret: str) -> dict:
        return {"addr": bao.addr, "token_role": "broker-instance",
                "instance_policies": ["broker-instance"],
                "auth": {"method": "approle", "role_id": role_id, "secret_id": secret}}

    b = await make_broker(overrides={"vault": vault_cfg(secret_id)})
    assert isinstance(b.settings.vault.auth, AppRoleAuth)
    async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-cert"},
                         headers={"Authorization": f"Bearer {b.token('i-approle')}"}) as r:
        assert r.status == 201, await r.text()
    [tok] = b.rows("instance_tokens")
    assert vault.token_meta(tok["accessor"])["instance_id"] == "i-approle"

    with pytest.raises(UpstreamRejected) as refused:
        await make_broker(overrides={"vault": vault_cfg("not-the-secret")})
    assert refused.value.code == "vault_invalid_request"


async def test_sealed_vault_is_not_ready_and_issuance_fails_closed(make_broker, http, workdir,
                                                                   pg, issuer):
    own = await asyncio.to_thread(started_openbao, workdir / "sealed-openbao")
    try:
        setup = await asyncio.to_thread(bootstrap_dev, own.addr, own.root_token,
                                        postgres_url=None)
        from broker.app import Broker, assemble
        from tests.conftest import broker_settings
        b = await make_broker()
        settings = broker_settings(store_url=b.store_url, bao=own, setup=setup, issuer=issuer)
        broker = Broker(assemble(settings))
        await broker.start()
        try:
            probe = VaultProbe(own.addr, own.root_token)
            assert probe.call("PUT", "sys/seal")[0] == 204
            async with http.get(f"{broker.url}/readyz") as resp:
                assert resp.status == 503
                body = await resp.json()
            assert body["checks"] == {"store": "ok", "vault": "sealed"}
            assert body["error"]["code"] == "not_ready"
            async with http.post(f"{broker.url}/v1/credentials", json={"role": "dev-cert"},
                                 headers={"Authorization": f"Bearer {b.token('i-seal')}"}) as r:
                err = await r.json()
            assert (r.status, err["error"]["code"]) == (503, "vault_unavailable")
            assert [x["state"] for x in b.rows("leases")] == ["failed"]
        finally:
            await broker.stop()
    finally:
        await asyncio.to_thread(own.stop)
