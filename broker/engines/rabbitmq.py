"""RabbitMQ: a dynamic user from Vault's rabbitmq engine (``<mount>/creds/<role>``).

Vault creates the user through RabbitMQ's management API with the vhost (and topic)
permissions and tags of its role, and deletes it when the lease is revoked; RabbitMQ then
closes the user's open connections too. What the user may do is decided by the Vault
role alone, so the broker only reads the path. The read takes no TTL: the lease starts at
the mount's ``config/lease`` TTL, and the broker shortens or lengthens it to what was
granted with a renewal (Vault honours the increment, capped by ``config/lease`` max_ttl).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from broker.engines.base import Engine, Mode, VaultRequest
from broker.vault import vault_path

if TYPE_CHECKING:
    from broker.config import RoleSettings


class RabbitMqEngine(Engine):
    name = "rabbitmq"
    kind = "rabbitmq_login"
    modes = {"dynamic": Mode()}

    def request(
        self, role: RoleSettings, params: Mapping[str, str], caller: Mapping[str, Any], ttl: int
    ) -> VaultRequest:
        return VaultRequest("GET", vault_path(role.mount, "creds", role.vault_role), None, False)

    def shape(self, role: RoleSettings, data: Mapping[str, Any]) -> dict[str, Any]:
        return {"username": data.get("username"), "password": data.get("password")}
