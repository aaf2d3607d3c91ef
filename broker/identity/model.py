"""The verified identity a token yields."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Identity:
    issuer_name: str
    issuer: str
    subject: str
    instance_id: str
    workload: str
    issued_at: datetime
    expires_at: datetime
    claims: Mapping[str, Any]
    jti: str | None = None
    # Set when the issuer's replay mode applies: the exchange consumes this token id.
    replay_key: str | None = None

    def public(self) -> dict[str, Any]:
        """What may be shown back to an admin: no signature, no raw token."""
        return {
            "issuer_name": self.issuer_name,
            "issuer": self.issuer,
            "subject": self.subject,
            "instance_id": self.instance_id,
            "workload": self.workload,
            "expires_at": self.expires_at.isoformat(),
        }
