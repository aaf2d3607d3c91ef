"""A local identity issuer for development: an ES256 key, its JWKS served over HTTP on
loopback (the broker fetches it like any other issuer's), and a way to mint tokens."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.dev import write_private
from broker.durations import parse_duration

DEV_AUDIENCE = "ephemeral-broker"
# The longest identity token the dev broker accepts (its issuer's max_token_lifetime).
DEV_MAX_TOKEN_LIFETIME_S = 3600


def dev_token_ttl(text: str) -> int:
    """``--ttl`` of ``broker dev token`` in seconds; ``ValueError`` saying the range when
    the dev broker would refuse the token (0 s, or longer than its issuer allows)."""
    ttl = parse_duration(text)
    if not 1 <= ttl <= DEV_MAX_TOKEN_LIFETIME_S:
        raise ValueError(
            f"{text!r} is out of range: the dev broker accepts tokens valid for 1s to "
            f"{_short(DEV_MAX_TOKEN_LIFETIME_S)}"
        )
    return ttl


def _short(seconds: int) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass
class DevIssuer:
    key: ec.EllipticCurvePrivateKey
    kid: str
    issuer: str
    audience: str = DEV_AUDIENCE

    @classmethod
    def generate(cls, issuer: str, audience: str = DEV_AUDIENCE) -> DevIssuer:
        return cls(
            ec.generate_private_key(ec.SECP256R1()), "dev-" + secrets.token_hex(4), issuer, audience
        )

    def jwks(self) -> dict[str, Any]:
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        public.update({"kid": self.kid, "alg": "ES256", "use": "sig"})
        return {"keys": [public]}

    def mint(
        self,
        *,
        instance: str,
        workload: str,
        ttl: int = 300,
        claims: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> str:
        iat = int(time.time() if now is None else now)
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": workload,
            "instance_id": instance,
            "workload": workload,
            "iat": iat,
            "nbf": iat,
            "exp": iat + ttl,
            "jti": secrets.token_hex(12),
        }
        payload.update(claims or {})
        payload = {k: v for k, v in payload.items() if v is not None}  # None: leave it out
        return jwt.encode(payload, self.key, algorithm="ES256", headers={"kid": self.kid})

    # -- persistence, so that `broker dev token` can sign for the running dev server ----

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private(directory / "issuer-key.pem", pem)
        (directory / "issuer.json").write_text(
            json.dumps({"issuer": self.issuer, "kid": self.kid, "audience": self.audience})
        )

    @classmethod
    def load(cls, directory: Path) -> DevIssuer:
        meta = json.loads((directory / "issuer.json").read_text())
        key = serialization.load_pem_private_key((directory / "issuer-key.pem").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(key, meta["kid"], meta["issuer"], meta["audience"])

    # -- HTTP ------------------------------------------------------------------------

    def app(self) -> web.Application:
        async def jwks(_: web.Request) -> web.Response:
            return web.json_response(self.jwks(), headers={"Cache-Control": "max-age=300"})

        async def discovery(_: web.Request) -> web.Response:
            return web.json_response(
                {
                    "issuer": self.issuer,
                    "jwks_uri": f"{self.issuer}/.well-known/jwks.json",
                    "id_token_signing_alg_values_supported": ["ES256"],
                }
            )

        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", jwks)
        app.router.add_get("/.well-known/openid-configuration", discovery)
        return app
