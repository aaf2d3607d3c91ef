"""Look at OpenBao with its root token, to assert what Vault really holds."""

from __future__ import annotations

import itertools
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

_TAKEN = itertools.count()


@dataclass(frozen=True, eq=False)
class VaultSnapshot:
    """What Vault holds at one moment: token accessors and the dev roles' leases.

    Two snapshots compare equal when the later one holds nothing the earlier one did not:
    nothing was minted in between. What the earlier one held and the later one does not
    has ended on its own (the session's OpenBao is shared, and earlier tests' tokens and
    leases expire at their TTL, sooner on a busy machine): that is not the request's doing.
    A revocation the broker makes is recorded in its store, whose snapshot is compared
    exactly beside this one."""

    accessors: frozenset[str]
    pki: frozenset[str]
    db: frozenset[str]
    taken: int = field(default_factory=lambda: next(_TAKEN))

    def minted_since(self, earlier: VaultSnapshot) -> dict[str, set[str]]:
        return {name: set(getattr(self, name) - getattr(earlier, name))
                for name in ("accessors", "pki", "db")
                if getattr(self, name) - getattr(earlier, name)}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VaultSnapshot):
            return NotImplemented
        earlier, later = sorted((self, other), key=lambda s: s.taken)
        return not later.minted_since(earlier)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"VaultSnapshot(#{self.taken}: {len(self.accessors)} accessors, "
                f"pki {sorted(self.pki)}, db {sorted(self.db)})")


class VaultProbe:
    def __init__(self, addr: str, token: str, timeout: float = 10.0) -> None:
        self.addr = addr
        self.token = token
        self.timeout = timeout  # a bench's teardown revokes thousands of leases at once

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.addr}/v1/{path}", data=data, method=method,
                                     headers={"X-Vault-Token": self.token})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, json.loads(raw) if raw else None

    def lease_exists(self, lease_id: str) -> bool:
        status, _ = self.call("PUT", "sys/leases/lookup", {"lease_id": lease_id})
        return status == 200

    def leases_under(self, prefix: str) -> list[str]:
        status, body = self.call("LIST", f"sys/leases/lookup/{prefix}")
        if status == 404:
            return []
        assert status == 200, body
        return list(body["data"]["keys"])

    def token_accessors(self) -> set[str]:
        status, body = self.call("LIST", "auth/token/accessors")
        assert status == 200, body
        return set(body["data"]["keys"])

    def accessor_alive(self, accessor: str) -> bool:
        status, _ = self.call("POST", "auth/token/lookup-accessor", {"accessor": accessor})
        return status == 200

    def token_meta(self, accessor: str) -> dict[str, Any]:
        status, body = self.call("POST", "auth/token/lookup-accessor", {"accessor": accessor})
        assert status == 200, body
        return body["data"].get("meta") or {}

    def snapshot(self) -> VaultSnapshot:
        """What a refused request must not add to (see ``VaultSnapshot``)."""
        return VaultSnapshot(frozenset(self.token_accessors()),
                             frozenset(self.leases_under("pki/issue/dev-cert/")),
                             frozenset(self.leases_under("database/creds/dev-db/")))
