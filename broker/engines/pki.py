"""PKI: an X.509 certificate issued by Vault (``<mount>/issue/<role>``).

The subject comes from the role's templates (e.g. ``{workload}.workload.internal``), never
from the request; Vault's role constrains which names are allowed on top of that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from broker.engines.base import Engine, Mode, VaultRequest
from broker.vault import vault_path

if TYPE_CHECKING:
    from broker.config import RoleSettings

_KEEP = (
    "certificate",
    "private_key",
    "private_key_type",
    "ca_chain",
    "issuing_ca",
    "serial_number",
    "expiration",
)
_NAMES = frozenset({"common_name", "alt_names"})


class PkiEngine(Engine):
    name = "pki"
    kind = "x509_certificate"
    modes = {"issue": Mode(templates=_NAMES, required_templates=frozenset({"common_name"}))}

    def request(
        self, role: RoleSettings, params: Mapping[str, str], caller: Mapping[str, Any], ttl: int
    ) -> VaultRequest:
        body: dict[str, Any] = {
            "common_name": params["common_name"],
            "ttl": f"{ttl}s",
            "format": "pem",
            "exclude_cn_from_sans": False,
        }
        if params.get("alt_names"):
            body["alt_names"] = params["alt_names"]
        return VaultRequest("POST", vault_path(role.mount, "issue", role.vault_role), body, True)

    def shape(self, role: RoleSettings, data: Mapping[str, Any]) -> dict[str, Any]:
        return {k: data[k] for k in _KEEP if k in data}
