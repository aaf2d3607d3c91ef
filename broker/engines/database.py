"""Database: a dynamic login from Vault's database engine (``<mount>/creds/<role>``).

The engine takes no TTL per request; the broker shortens the lease with a renewal when the
caller asked for less than the Vault role's default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.config import RoleSettings
from broker.engines.base import VaultRequest
from broker.vault import vault_path


class DatabaseEngine:
    kind = "database_login"
    params: frozenset[str] = frozenset()

    def request(self, role: RoleSettings, params: Mapping[str, str], ttl: int) -> VaultRequest:
        return VaultRequest("GET", vault_path(role.mount, "creds", role.vault_role), None, False)

    def shape(self, data: Mapping[str, Any]) -> dict[str, Any]:
        return {"username": data.get("username"), "password": data.get("password")}
