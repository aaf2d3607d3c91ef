"""Look at OpenBao with its root token, to assert what Vault really holds."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


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

    def snapshot(self) -> dict[str, Any]:
        """What a refused request must not change."""
        return {"accessors": self.token_accessors(),
                "pki": set(self.leases_under("pki/issue/dev-cert/")),
                "db": set(self.leases_under("database/creds/dev-db/"))}
