"""The ``revocation`` and ``reconcile`` sections: how often and how hard the worker and
the reconciler try."""

from __future__ import annotations

from pydantic import Field

from broker.settings import Frozen


class RevocationSettings(Frozen):
    tick_s: float = Field(1.0, gt=0, le=300)
    batch: int = Field(8, ge=1, le=256)
    claim_timeout_s: int = Field(120, ge=5, le=3600)
    backoff_base_s: float = Field(1.0, gt=0, le=600)
    backoff_max_s: float = Field(300.0, gt=0, le=86400)
    max_attempts: int = Field(12, ge=1, le=1000)
    issuing_timeout_s: int = Field(120, ge=5, le=3600)


class ReconcileSettings(Frozen):
    """The periodic reconciliation of the store against Vault (``broker.revocation.reconcile``)."""

    tick_s: float = Field(60.0, gt=0, le=86400)
    # Leases past their expiry by this much are confirmed with Vault and marked expired.
    expiry_margin_s: int = Field(30, ge=0, le=86400)
    # Revoke the Vault leases under the broker's paths that the store does not know
    # (otherwise they are reported only).
    revoke_orphans: bool = False
    # Allowed difference between the broker's clock and Vault's when matching a stuck
    # request to the lease Vault issued for it.
    clock_skew_s: int = Field(5, ge=0, le=600)
    batch: int = Field(500, ge=1, le=10000)
