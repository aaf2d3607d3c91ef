"""One module per Vault secrets engine: which path to call and how to shape the answer."""

from broker.engines.base import Engine, Mode, VaultRequest, read_caller_params, validate_role
from broker.engines.database import DatabaseEngine
from broker.engines.pki import PkiEngine

ENGINES: dict[str, Engine] = {e.name: e for e in (PkiEngine(), DatabaseEngine())}

__all__ = ["ENGINES", "Engine", "Mode", "VaultRequest", "read_caller_params", "validate_role"]
