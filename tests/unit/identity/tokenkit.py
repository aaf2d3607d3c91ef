"""Shared helpers for the identity tests: real keys, hand-assembled tokens, a fixed clock.

Tokens are built the way an attacker would: JSON segments written byte for byte,
base64url-encoded, and signed (or not) with whatever key and algorithm the test chooses.
Nothing here goes through the broker's own code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

from broker.errors import TokenInvalid
from broker.identity.model import Identity
from broker.identity.settings import IssuerSettings
from broker.identity.verify import inspect_token, verify_signed

# A fixed point in time; every token is built relative to it.
NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
NOW_TS = int(NOW.timestamp())
ISSUER = "https://issuer.example"
AUDIENCE = "broker"
MAX_BYTES = 16 * 1024

# Real keys, generated once per test process.
EC256 = ec.generate_private_key(ec.SECP256R1())
EC384 = ec.generate_private_key(ec.SECP384R1())
RSA2048 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024)
ED25519 = ed25519.Ed25519PrivateKey.generate()

_ALGS = get_default_algorithms()


def issuer(**overrides: Any) -> IssuerSettings:
    fields: dict[str, Any] = {
        "name": "k8s",
        "issuer": ISSUER,
        "jwks_uri": "https://issuer.example/jwks",
        "algorithms": ("ES256",),
        "instance_claim": ("sub",),
        "workload_claim": ("sub",),
        "leeway_s": 30,
        "max_token_lifetime": 3600,
    }
    fields.update(overrides)
    return IssuerSettings(**fields)


DEFAULT_ISSUER = issuer()
ALL_ALGS_ISSUER = issuer(algorithms=("ES256", "ES384", "RS256", "PS256", "EdDSA"))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def seg(value: Any) -> str:
    """A JSON segment: bytes are taken verbatim, anything else is JSON-encoded."""
    if isinstance(value, bytes):
        return b64(value)
    return b64(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "pod-7f3a",
        "iat": NOW_TS - 60,
        "exp": NOW_TS + 600,
        "jti": "jti-0001",
    }
    for name, value in overrides.items():
        if value is DROP:
            base.pop(name, None)
        else:
            base[name] = value
    return base


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


DROP = _Drop()


def sign_input(signing_input: str, key: Any, alg: str) -> str:
    """The base64url signature of ``signing_input`` (raw r||s for ECDSA, as JWS wants)."""
    return b64(_ALGS[alg].sign(signing_input.encode("ascii"), key))


def token(payload: Any = None, *, header: Any = None, key: Any = EC256, alg: str = "ES256",
          kid: str | None = "k1") -> str:
    """Assemble and sign a token by hand. ``header``/``payload`` may be bytes (verbatim)."""
    if header is None:
        header = {"alg": alg, "typ": "JWT"}
        if kid is not None:
            header["kid"] = kid
    if payload is None:
        payload = claims()
    signing_input = f"{seg(header)}.{seg(payload)}"
    return f"{signing_input}.{sign_input(signing_input, key, alg)}"


def hs256_token(payload: Any, secret: bytes) -> str:
    signing_input = f"{seg({'alg': 'HS256', 'typ': 'JWT', 'kid': 'k1'})}.{seg(payload)}"
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def pyjwt_token(payload: dict[str, Any], key: Any, alg: str, kid: str = "k1") -> str:
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid})


def verify(raw: str, *, key: Any = None, iss: IssuerSettings = DEFAULT_ISSUER,
           now: datetime = NOW, max_bytes: int = MAX_BYTES,
           audience: str = AUDIENCE) -> Identity:
    """inspect_token + verify_signed, exactly as the async verifier chains them."""
    unverified = inspect_token(raw, max_bytes=max_bytes)
    public = (EC256 if key is None else key)
    if hasattr(public, "public_key"):
        public = public.public_key()
    return verify_signed(raw, unverified, iss, public, audience=audience, now=now)


def outcome(raw: str, **kwargs: Any) -> str:
    """'accepted' or 'refused:<code>'; any other exception propagates."""
    try:
        verify(raw, **kwargs)
    except TokenInvalid as exc:
        return f"refused:{exc.code}"
    return "accepted"


class Monotonic:
    """A monotonic clock the test moves by hand (JwksCache cooldowns and freshness)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
