"""An instance id belongs to the issuer that first presented it: another issuer whose
tokens happen to carry the same id cannot draw on, renew or release its leases."""

from __future__ import annotations

from broker.dev.issuer import DevIssuer
from tests.harness.ports import held_socket, port_of, serve_app


async def test_a_second_issuer_cannot_use_an_instance_id_it_does_not_own(make_broker, http,
                                                                         issuer, vault):
    sock = held_socket()
    other = DevIssuer.generate(f"http://127.0.0.1:{port_of(sock)}")
    runner, _ = await serve_app(other.app(), sock, access_log=None)
    try:
        issuers = [{"name": name, "issuer": i.issuer,
                    "jwks_uri": f"{i.issuer}/.well-known/jwks.json", "algorithms": ["ES256"],
                    "instance_claim": "instance_id", "workload_claim": "workload"}
                   for name, i in (("dev", issuer), ("other", other))]
        b = await make_broker(overrides={
            "identity": {"audience": issuer.audience, "issuers": issuers},
            "policy": {"rules": [{"name": f"all-{i}", "issuer": i,
                                  "allow": ["dev-cert", "dev-db"]} for i in ("dev", "other")]},
        })
        mine = {"Authorization": f"Bearer {issuer.mint(instance='i-same', workload='payments')}"}
        theirs = {"Authorization":
                  f"Bearer {other.mint(instance='i-same', workload='payments')}"}

        async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-db"},
                             headers=mine) as resp:
            assert resp.status == 201
            lease_id = (await resp.json())["lease_id"]

        before = (b.store_snapshot(), vault.snapshot())
        async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-db"},
                             headers=theirs) as resp:
            body = await resp.json()
        assert (resp.status, body["error"]["code"]) == (403, "instance_issuer_mismatch")
        for method, path in (("POST", f"/v1/leases/{lease_id}/renew"),
                             ("DELETE", f"/v1/leases/{lease_id}")):
            async with http.request(method, f"{b.url}{path}", headers=theirs) as resp:
                assert resp.status == 404
                assert (await resp.json())["error"]["code"] == "lease_not_found"
        assert (b.store_snapshot(), vault.snapshot()) == before
        [lease] = b.rows("leases")
        assert lease["state"] == "active" and vault.lease_exists(lease["vault_lease_id"])

        # The owner still can.
        async with http.delete(f"{b.url}/v1/leases/{lease_id}", headers=mine) as resp:
            assert resp.status == 204
    finally:
        await runner.cleanup()
