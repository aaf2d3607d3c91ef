"""A role of the configuration (``roles.<name>``): which engine, mount and Vault role it
uses, its TTLs, the parameters templated from the identity, and its lease limit. Checked
at load against its engine (``broker.engines.validate_role``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from broker.engines import ENGINES, validate_role
from broker.settings import Duration, Frozen, seconds, template_fields
from broker.vault.paths import NAME_SEGMENT

# The identity values a role-parameter template may use.
TEMPLATE_FIELDS = frozenset({"instance_id", "workload", "issuer_name"})


class RoleSettings(Frozen):
    engine: str
    mode: str | None = None  # the engine's default mode unless set
    mount: str
    vault_role: str
    default_ttl: Duration = 600
    max_ttl: Duration = 3600
    params: dict[str, str] = Field(default_factory=dict)  # templated from the identity
    # What a caller may send (e.g. a CSR); by default what the engine's mode requires.
    request_params: tuple[str, ...] | None = None
    options: dict[str, Any] = Field(default_factory=dict)  # fixed, engine-specific
    # At most this many live leases per instance and role. A crash-looping workload that
    # asks again and again replaces its oldest lease, or is refused.
    max_leases_per_instance: int = Field(3, ge=1, le=1000)
    on_limit: Literal["revoke_oldest", "refuse"] = "revoke_oldest"

    _ttls = field_validator("default_ttl", "max_ttl", mode="before")(seconds)

    @field_validator("mount", "vault_role")
    @classmethod
    def _segment(cls, v: str) -> str:
        if not NAME_SEGMENT.match(v) or ".." in v:
            raise ValueError("expected one Vault path segment (letters, digits, _ . -)")
        return v

    @model_validator(mode="after")
    def _params(self) -> RoleSettings:
        engine = ENGINES.get(self.engine)
        if engine is None:
            raise ValueError(f"engine: expected one of {', '.join(sorted(ENGINES))}")
        validate_role(engine, self)
        for name, template in self.params.items():
            try:
                fields = template_fields(template)
            except ValueError as exc:
                raise ValueError(f"params.{name}: {exc}") from None
            bad = fields - TEMPLATE_FIELDS
            if bad:
                raise ValueError(
                    f"params.{name}: unknown template field(s) {sorted(bad)}; "
                    f"use {sorted(TEMPLATE_FIELDS)}"
                )
        return self

    @model_validator(mode="after")
    def _ttl_order(self) -> RoleSettings:
        if self.max_ttl < 1:
            raise ValueError("max_ttl must be at least 1s")
        if self.default_ttl > self.max_ttl:
            raise ValueError("default_ttl must not exceed max_ttl")
        return self
