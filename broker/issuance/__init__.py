"""The exchange: an identity asks for a role and gets a recorded, Vault-issued credential."""

from broker.issuance.service import CredentialService, IssuedCredential

__all__ = ["CredentialService", "IssuedCredential"]
