"""One module per Vault secrets engine: which path to call and how to shape the answer.

Every module in this package that defines an ``Engine`` subclass with a ``name`` is an
engine: adding one is adding its file (and a role in the configuration that uses it).
A role's settings (``role.RoleSettings``) live here too, checked against the engine they name.
"""

from __future__ import annotations

import importlib
import pkgutil

from broker.engines.base import (
    Engine,
    Mode,
    Plan,
    VaultRequest,
    read_caller_params,
    validate_role,
)

# The interface, the role settings (which check a role against this registry), and the
# direct checks of a lost lease's credential (I/O, asked by the lease-ending decision).
_NOT_ENGINES = frozenset({"base", "role", "checks"})


def _discover() -> dict[str, Engine]:
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_ENGINES and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    found: dict[str, Engine] = {}
    pending = list(Engine.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        name = cls.__dict__.get("name")
        if name is None:
            continue
        if name in found:
            raise RuntimeError(f"two engines are named {name!r}")
        found[name] = cls()
    return dict(sorted(found.items()))


ENGINES: dict[str, Engine] = _discover()

__all__ = [
    "ENGINES",
    "Engine",
    "Mode",
    "Plan",
    "VaultRequest",
    "read_caller_params",
    "validate_role",
]
