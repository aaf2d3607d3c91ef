"""Who is asking: verify a workload identity token and map it to an ``Identity``."""

from broker.identity.model import Identity
from broker.identity.verifier import IdentityVerifier

__all__ = ["Identity", "IdentityVerifier"]
