"""Azure: a service principal's client secret from HashiCorp Vault's Azure secrets engine
(``<mount>/creds/<role>``; not part of OpenBao).

Mapped on the engine's documented answer (``client_id``, ``client_secret`` under a lease
whose revocation deletes the application, or the password on an existing one), not
exercised end to end here. The tenant (and optionally the subscription) is not in the
answer: it is fixed in the broker role's options, and the shape uses the variable names
Azure's SDKs and CLI read (``EnvironmentCredential``), so a workload can export it as is.
The engine takes no TTL per request; the broker shortens the lease by renewal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from broker.engines.base import Engine, Mode, VaultRequest, text_ref
from broker.errors import UpstreamRejected
from broker.vault.paths import vault_path

if TYPE_CHECKING:
    from broker.engines.role import RoleSettings

_GUID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")
# A tenant is named by its id or by one of its verified domains (contoso.onmicrosoft.com).
_DOMAIN = re.compile(
    r"^(?=.{1,253}\Z)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,63}\Z"
)


class AzureEngine(Engine):
    name = "azure"
    kind = "azure_service_principal"
    modes = {
        "dynamic": Mode(
            options=frozenset({"tenant_id", "subscription_id"}),
            required_options=frozenset({"tenant_id"}),
        )
    }

    def check_role(self, role: RoleSettings) -> None:
        tenant = role.options.get("tenant_id")
        if not isinstance(tenant, str) or not (_GUID.match(tenant) or _DOMAIN.match(tenant)):
            raise ValueError(
                "options.tenant_id: expected the directory (tenant) id, a GUID, or one of "
                "its domains such as contoso.onmicrosoft.com"
            )
        subscription = role.options.get("subscription_id")
        if subscription is not None and (
            not isinstance(subscription, str) or not _GUID.match(subscription)
        ):
            raise ValueError("options.subscription_id: expected the subscription id, a GUID")

    def request(
        self, role: RoleSettings, params: Mapping[str, str], caller: Mapping[str, Any], ttl: int
    ) -> VaultRequest:
        return VaultRequest("GET", vault_path(role.mount, "creds", role.vault_role), None, False)

    def identifier(self, role: RoleSettings, data: Mapping[str, Any]) -> dict[str, str] | None:
        return text_ref(data, client_id="client_id")  # the application's id: no secret

    def shape(self, role: RoleSettings, data: Mapping[str, Any]) -> dict[str, Any]:
        out = {
            "AZURE_CLIENT_ID": _text(data, "client_id"),
            "AZURE_CLIENT_SECRET": _text(data, "client_secret"),
            "AZURE_TENANT_ID": role.options["tenant_id"],
        }
        if "subscription_id" in role.options:
            out["AZURE_SUBSCRIPTION_ID"] = role.options["subscription_id"]
        return out


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise UpstreamRejected(
            f"Vault's Azure answer is not usable: {key} is missing or not a string; check "
            "the Azure secrets engine",
            code="vault_bad_response",
        )
    return value
