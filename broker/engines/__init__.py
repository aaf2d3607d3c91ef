"""One module per Vault secrets engine: which path to call and how to shape the answer."""

from broker.engines.base import Engine, VaultRequest
from broker.engines.database import DatabaseEngine
from broker.engines.pki import PkiEngine

ENGINES: dict[str, Engine] = {"pki": PkiEngine(), "database": DatabaseEngine()}

__all__ = ["ENGINES", "Engine", "VaultRequest"]
