"""The broker follows an issuer's key rotation without restart, survives an issuer outage
within the stale bound, and a spray of unknown kids costs the issuer one fetch."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from tests.harness.ports import held_socket, port_of, serve_app

AUD = "ephemeral-broker"


class RotatingIssuer:
    def __init__(self) -> None:
        self.sock = held_socket()
        self.port = port_of(self.sock)
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        self.fetches = 0
        self.down = False
        self.runner: web.AppRunner | None = None

    def rotate(self) -> str:
        kid = "k-" + secrets.token_hex(4)
        self.keys = {kid: ec.generate_private_key(ec.SECP256R1())}
        return kid

    def mint(self, kid: str, instance: str, key=None) -> str:
        now = int(time.time())
        return jwt.encode({"iss": self.issuer, "aud": AUD, "sub": "w", "instance_id": instance,
                           "workload": "payments", "iat": now, "exp": now + 300},
                          key or self.keys[kid], algorithm="ES256", headers={"kid": kid})

    async def start(self) -> None:
        async def jwks(_: web.Request) -> web.Response:
            self.fetches += 1
            if self.down:
                return web.Response(status=503)
            keys = []
            for kid, key in self.keys.items():
                jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
                keys.append({**jwk, "kid": kid, "alg": "ES256", "use": "sig"})
            return web.json_response({"keys": keys})

        app = web.Application()
        app.router.add_get("/jwks", jwks)
        self.runner, _ = await serve_app(app, self.sock, access_log=None)


async def _post(http, b, token):
    async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-cert"},
                         headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, await resp.json()


def _identity(rot: RotatingIssuer, cooldown: float, ttl: int = 3600) -> dict:
    return {"audience": AUD, "issuers": [{
        "name": "rot", "issuer": rot.issuer, "jwks_uri": f"{rot.issuer}/jwks",
        "algorithms": ["ES256"], "instance_claim": "instance_id", "workload_claim": "workload",
        "jwks_refresh_cooldown_s": cooldown, "jwks_cache_ttl_s": ttl,
        "jwks_stale_max_s": 3600, "replay": "off"}]}


async def test_rotation_is_followed_and_an_outage_is_survived(make_broker, http):
    rot = RotatingIssuer()
    first = rot.rotate()
    await rot.start()
    try:
        b = await make_broker(overrides={
            "identity": _identity(rot, cooldown=0, ttl=1),
            "policy": {"rules": [{"name": "all", "allow": ["dev-cert"]}]}})
        assert (await _post(http, b, rot.mint(first, "i-rot")))[0] == 201

        old_key = rot.keys[first]
        second = rot.rotate()  # the issuer now publishes only the new key
        assert (await _post(http, b, rot.mint(second, "i-rot")))[0] == 201
        status, body = await _post(http, b, rot.mint(first, "i-rot", key=old_key))
        assert (status, body["error"]["code"]) == (401, "token_unknown_key")

        # Outage after the keys went stale: the refresh fails, the last good keys serve.
        await asyncio.sleep(1.2)
        rot.down = True
        fetches = rot.fetches
        assert (await _post(http, b, rot.mint(second, "i-rot")))[0] == 201
        assert rot.fetches == fetches + 1  # it did try, and was refused
    finally:
        await rot.runner.cleanup()


async def test_a_kid_spray_costs_the_issuer_one_fetch(make_broker, http, vault):
    rot = RotatingIssuer()
    kid = rot.rotate()
    await rot.start()
    try:
        b = await make_broker(overrides={
            "identity": _identity(rot, cooldown=300),
            "policy": {"rules": [{"name": "all", "allow": ["dev-cert"]}]}})
        assert (await _post(http, b, rot.mint(kid, "i-spray")))[0] == 201
        fetches = rot.fetches
        before = (b.store_snapshot(), vault.snapshot())
        key = rot.keys[kid]
        for _ in range(60):
            status, body = await _post(http, b, rot.mint("k-" + secrets.token_hex(6), "i-spray",
                                                         key=key))
            assert (status, body["error"]["code"]) == (401, "token_unknown_key")
        assert rot.fetches - fetches <= 1
        assert (b.store_snapshot(), vault.snapshot()) == before
    finally:
        await rot.runner.cleanup()
