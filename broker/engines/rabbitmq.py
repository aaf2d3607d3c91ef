"""RabbitMQ: a dynamic user from Vault's rabbitmq engine (``<mount>/creds/<role>``).

Vault creates the user through RabbitMQ's management API with the vhost (and topic)
permissions and tags of its role, and deletes it when the lease is revoked; RabbitMQ then
closes the user's open connections too. What the user may do is decided by the Vault
role alone, so the broker only reads the path. The read takes no TTL: the lease starts at
the mount's ``config/lease`` TTL, and the broker shortens or lengthens it to what was
granted with a renewal (Vault honours the increment, capped by ``config/lease`` max_ttl).
"""

from __future__ import annotations

from broker.engines.database import DatabaseEngine


class RabbitMqEngine(DatabaseEngine):
    """The same read and the same login shape as a database's; only the kind differs."""

    name = "rabbitmq"
    kind = "rabbitmq_login"
