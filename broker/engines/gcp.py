"""GCP: OAuth2 access tokens and service-account keys from HashiCorp Vault's GCP secrets
engine (not part of OpenBao).

Mapped on the engine's documented answers, not exercised end to end here:

- ``<mount>/roleset/<r>/token``, ``<mount>/static-account/<a>/token`` and
  ``<mount>/impersonated-account/<a>/token`` answer ``token``, ``token_ttl`` and
  ``expires_at_seconds`` with no lease: Google cannot revoke an access token, so it lives
  its hour whatever happens to the instance. Recorded as ``delivered``.
- ``<mount>/roleset/<r>/key`` and ``<mount>/static-account/<a>/key`` answer
  ``private_key_data`` (a base64 JSON key file), ``key_algorithm`` and ``key_type`` under a
  lease whose revocation deletes the key in GCP.

Every mode has one shape, ``type`` saying which: an access token with its expiry in ISO
8601 UTC, or the decoded key file a Google client library reads. An answer that does not
fit is Vault's fault, refused with ``vault_bad_response`` and never echoed.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from broker.clock import iso_z
from broker.engines.base import Engine, Mode, VaultRequest
from broker.errors import UpstreamRejected
from broker.vault.paths import vault_path

if TYPE_CHECKING:
    from broker.engines.role import RoleSettings

# mode → (Vault path kind, what it issues)
_PATHS: dict[str, tuple[str, str]] = {
    "roleset_token": ("roleset", "token"),
    "static_account_token": ("static-account", "token"),
    "impersonated_account_token": ("impersonated-account", "token"),
    "roleset_key": ("roleset", "key"),
    "static_account_key": ("static-account", "key"),
}
# What the broker asks a key to be: the only format it can decode and hand on as JSON.
_KEY_BODY = {"key_algorithm": "KEY_ALG_RSA_2048", "key_type": "TYPE_GOOGLE_CREDENTIALS_FILE"}
# An access token answer is refused if its expiry is not within this range (epoch
# seconds): 2001 to 2286, which also keeps ``datetime`` from overflowing.
_EPOCH_RANGE = (1_000_000_000, 10_000_000_000)


def _bad(what: str) -> UpstreamRejected:
    return UpstreamRejected(
        f"Vault's GCP answer is not usable: {what}; check the GCP secrets engine and the "
        "Vault role's secret type",
        code="vault_bad_response",
    )


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(f"{key} is missing or not a string")
    return value


def access_token(data: Mapping[str, Any]) -> dict[str, Any]:
    """``token`` / ``expires_at_seconds`` → the caller's access-token shape."""
    token = _text(data, "token")
    expires = data.get("expires_at_seconds")
    if (
        not isinstance(expires, int)
        or isinstance(expires, bool)
        or not _EPOCH_RANGE[0] <= expires < _EPOCH_RANGE[1]
    ):
        raise _bad("expires_at_seconds is missing or not a time in epoch seconds")
    return {
        "type": "access_token",
        "access_token": token,
        "token_type": "Bearer",
        "expires_at": iso_z(datetime.fromtimestamp(expires, UTC)),
    }


def service_account_key(data: Mapping[str, Any]) -> dict[str, Any]:
    """``private_key_data`` (base64 of a JSON key file) → the decoded key file."""
    raw = _text(data, "private_key_data")
    try:
        decoded = json.loads(base64.b64decode(raw, validate=True))
    except (binascii.Error, ValueError, RecursionError):
        # Neither error is chained or quoted: both can carry the key material.
        raise _bad("private_key_data is not a base64 JSON key file") from None
    if not isinstance(decoded, dict) or decoded.get("type") != "service_account":
        raise _bad("private_key_data is not a service-account key file")
    for key in ("private_key", "client_email"):
        _text(decoded, key)
    return {"type": "service_account_key", "credentials": decoded}


class GcpEngine(Engine):
    name = "gcp"
    kind = "gcp_credential"
    modes = {
        "roleset_token": Mode(leased=False),
        "static_account_token": Mode(leased=False),
        "impersonated_account_token": Mode(leased=False),
        "roleset_key": Mode(),
        "static_account_key": Mode(),
    }

    def _mode_name(self, role: RoleSettings) -> str:
        return role.mode or next(iter(self.modes))

    def request(
        self, role: RoleSettings, params: Mapping[str, str], caller: Mapping[str, Any], ttl: int
    ) -> VaultRequest:
        account, issues = _PATHS[self._mode_name(role)]
        path = vault_path(role.mount, account, role.vault_role, issues)
        if issues == "token":
            # Google fixes a token's lifetime; Vault takes no TTL for it.
            return VaultRequest("GET", path, None, False)
        return VaultRequest("POST", path, {**_KEY_BODY, "ttl": f"{ttl}s"}, True)

    def shape(self, role: RoleSettings, data: Mapping[str, Any]) -> dict[str, Any]:
        if _PATHS[self._mode_name(role)][1] == "token":
            return access_token(data)
        return service_account_key(data)
