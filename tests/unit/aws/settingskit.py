"""Shared helpers for the tests that load settings with an aws role: the smallest valid
settings document around given roles, and a web_identity role that needs the ``aws`` section."""

from __future__ import annotations

from typing import Any

ARN = "arn:aws:iam::123456789012:role/broker-web"
# An STS session cannot be revoked: an STS role lives exactly 15m and refuses at its limit.
STS = {"default_ttl": "15m", "max_ttl": "15m", "on_limit": "refuse"}


def settings_with(roles: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "vault": {
            "addr": "http://127.0.0.1:8200",
            "auth": {"method": "token", "token": "t"},
            **top.pop("vault", {}),
        },
        "identity": {
            "audience": "a",
            "issuers": [
                {
                    "name": "dev",
                    "issuer": "https://issuer.example",
                    "jwks_uri": "https://issuer.example/k",
                    "instance_claim": "iid",
                    "workload_claim": "wl",
                }
            ],
        },
        "roles": roles,
        "admin": {"token_sha256": "0" * 64},
        **top,
    }


WEB = {
    "engine": "aws",
    "mode": "web_identity",
    "mount": "identity",
    "vault_role": "aws",
    "options": {"role_arn": ARN},
    **STS,
}
