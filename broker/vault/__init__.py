"""The only package that talks to Vault/OpenBao.

``client`` speaks Vault's HTTP API with aiohttp on the hot path (hvac is synchronous and
would stall the event loop); ``bootstrap`` uses hvac, in a worker thread, for one-off
configuration such as the dev server's mounts and roles. Errors leave this package as
``UpstreamUnavailable`` / ``UpstreamRejected``; nothing above it sees aiohttp or hvac.
"""

from broker.vault.client import InstanceToken, IssuedSecret, VaultClient, VaultHealth
from broker.vault.paths import vault_path

__all__ = ["InstanceToken", "IssuedSecret", "VaultClient", "VaultHealth", "vault_path"]
