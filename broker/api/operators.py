"""Who is calling the admin API: a named operator with a scope.

Scopes nest: ``read`` (list, show, explain, audit), ``revoke`` (terminate, lock, and all
of ``read``), ``admin`` (everything, including retry and reconcile with orphan revocation).
Every admin handler names the scope it needs and receives the ``Operator`` it records as
the actor of what it changes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Scope(enum.IntEnum):
    READ = 1
    REVOKE = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Operator:
    """An authenticated admin caller. ``via`` says how (``token``, ``oidc``)."""

    name: str
    scope: Scope
    via: str = "token"

    @property
    def actor(self) -> str:
        """How the store and the audit name this operator."""
        return f"operator:{self.name}"

    def may(self, needed: Scope) -> bool:
        return self.scope >= needed
