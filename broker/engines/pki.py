"""PKI: an X.509 certificate and key issued by Vault (``<mount>/issue/<role>``).

The subject comes from the role's templates (e.g. ``{workload}.workload.internal``), never
from the request; Vault's role constrains which names are allowed on top of that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.config import RoleSettings
from broker.engines.base import VaultRequest
from broker.vault import vault_path

_KEEP = (
    "certificate",
    "private_key",
    "private_key_type",
    "ca_chain",
    "issuing_ca",
    "serial_number",
    "expiration",
)


class PkiEngine:
    kind = "x509_certificate"
    params = frozenset({"common_name", "alt_names"})

    def request(self, role: RoleSettings, params: Mapping[str, str], ttl: int) -> VaultRequest:
        body: dict[str, Any] = {
            "common_name": params["common_name"],
            "ttl": f"{ttl}s",
            "format": "pem",
            "exclude_cn_from_sans": False,
        }
        if params.get("alt_names"):
            body["alt_names"] = params["alt_names"]
        return VaultRequest("POST", vault_path(role.mount, "issue", role.vault_role), body, True)

    def shape(self, data: Mapping[str, Any]) -> dict[str, Any]:
        return {k: data[k] for k in _KEEP if k in data}
