"""OpenBao/Vault transit: signing with a named key and reading its public keys, for the
audit's signed checkpoints. The key never leaves Vault; the broker's policy needs
``update`` on ``<mount>/sign/<key>`` and ``read`` on ``<mount>/keys/<key>``.

It shares the broker's ``VaultClient`` transport (its session, token and error
translation) rather than opening a second one; a class of its own keeps the client's
surface to the credential calls.
"""

from __future__ import annotations

import base64
import binascii

from broker.errors import UpstreamRejected
from broker.vault.client import VaultClient
from broker.vault.paths import vault_path

_PREFIX = "vault:v"


class Transit:
    def __init__(self, vault: VaultClient, mount: str) -> None:
        self._vault = vault
        self._mount = mount

    async def sign(self, key: str, data: bytes) -> tuple[bytes, int]:
        """The raw signature of ``data`` by ``key``'s newest version, and that version."""
        body = await self._vault._call(  # noqa: SLF001 — the package's own transport
            "POST",
            f"/v1/{vault_path(self._mount, 'sign', key)}",
            json={"input": base64.b64encode(data).decode("ascii")},
        )
        data_out = body.get("data") or {}
        text = str(data_out.get("signature") or "")
        version, _, encoded = text.removeprefix(_PREFIX).partition(":")
        try:
            signature = base64.b64decode(encoded, validate=True)
            number = int(version)
        except (ValueError, binascii.Error):
            raise UpstreamRejected(
                "Vault returned no transit signature", code="vault_bad_response"
            ) from None
        if not text.startswith(_PREFIX) or not signature:
            raise UpstreamRejected("Vault returned no transit signature", code="vault_bad_response")
        return signature, number

    async def public_keys(self, key: str) -> dict[int, bytes]:
        """Every version's raw public key (Ed25519: 32 bytes), by version."""
        body = await self._vault._call(  # noqa: SLF001 — the package's own transport
            "GET", f"/v1/{vault_path(self._mount, 'keys', key)}"
        )
        data = body.get("data") or {}
        if data.get("type") != "ed25519":
            raise UpstreamRejected(
                f"the transit key {key!r} is not an ed25519 key", code="vault_bad_response"
            )
        found: dict[int, bytes] = {}
        for version, entry in (data.get("keys") or {}).items():
            try:
                found[int(version)] = base64.b64decode(entry["public_key"], validate=True)
            except (ValueError, KeyError, TypeError, binascii.Error):
                continue
        return found
