"""The interface every engine implements."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from broker.config import RoleSettings


@dataclass(frozen=True)
class VaultRequest:
    method: str
    path: str  # already escaped, relative to /v1/
    body: dict[str, Any] | None
    ttl_applied: bool  # False when the engine cannot set a TTL per request


class Engine(Protocol):
    kind: str  # the credential kind callers see
    params: frozenset[str]  # parameters a role may template

    def request(self, role: RoleSettings, params: Mapping[str, str], ttl: int) -> VaultRequest: ...

    def shape(self, data: Mapping[str, Any]) -> dict[str, Any]: ...
