"""Database: a dynamic login from Vault's database engine (``<mount>/creds/<role>``).

One module serves every database plugin Vault and OpenBao share (PostgreSQL, MySQL and
MariaDB, Redis and Valkey, …): the Vault role's creation statements decide what the login
may do, so the broker only reads the path. The engine takes no TTL per request; the broker
sets the lease to the granted TTL with a renewal when it differs from the role's default.
Every plugin answers with ``username`` and ``password``; ``deploy/engines/database.md``
shows narrow roles for PostgreSQL, MariaDB and Redis that end open sessions on revocation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from broker.engines.base import Engine, Mode, VaultRequest, text_ref
from broker.vault.paths import vault_path

if TYPE_CHECKING:
    from broker.engines.role import RoleSettings


class DatabaseEngine(Engine):
    name = "database"
    kind = "database_login"
    modes = {"dynamic": Mode()}

    def request(
        self, role: RoleSettings, params: Mapping[str, str], caller: Mapping[str, Any], ttl: int
    ) -> VaultRequest:
        return VaultRequest("GET", vault_path(role.mount, "creds", role.vault_role), None, False)

    def shape(self, role: RoleSettings, data: Mapping[str, Any]) -> dict[str, Any]:
        return {"username": data.get("username"), "password": data.get("password")}

    def identifier(self, role: RoleSettings, data: Mapping[str, Any]) -> dict[str, str] | None:
        return text_ref(data, username="username")
