"""The ``admin`` section: who may call the admin API, and with which scope.

Two ways to be an operator: a named static token (the configuration holds its SHA-256,
never the token), or a JWT from one configured operator issuer, verified by the same
hardened code as the workloads' tokens (``broker.identity``). The single
``admin.token_sha256`` of earlier configurations is the operator ``admin`` with scope
``admin``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from broker.identity.settings import IssuerSettings
from broker.settings import Frozen

OPERATOR_NAME = re.compile(r"^[a-z0-9._@-]{1,64}\Z")
ScopeName = Literal["read", "revoke", "admin"]
# Keys of an issuer that say how a *workload's* token maps to an instance: meaningless for
# an operator, refused so that nobody believes they apply.
_WORKLOAD_ONLY = (
    "name",
    "kind",
    "instance_claim",
    "workload_claim",
    "replay",
    "liveness",
    "trust_domain",
    "spiffe_bundle_uri",
)


def _sha256_hex(v: str) -> str:
    v = v.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", v):
        raise ValueError("expected the hex SHA-256 of the token (64 hex digits)")
    return v


class StaticOperatorSettings(Frozen):
    """An operator who presents a static token; the configuration holds its SHA-256."""

    name: str
    token_sha256: str
    scope: ScopeName

    @field_validator("token_sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        return _sha256_hex(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not OPERATOR_NAME.match(v):
            raise ValueError("expected 1-64 of lower-case letters, digits, '.', '_', '@', '-'")
        return v


class ScopeRuleSettings(Frozen):
    """A claim value that grants a scope: ``{claim: groups, value: sec-oncall, scope:
    revoke}``. A list claim matches when it holds the value."""

    claim: str = Field(min_length=1, max_length=128)
    value: str = Field(min_length=1, max_length=255)
    scope: ScopeName


class OperatorIssuerSettings(IssuerSettings):
    """The operator issuer: where its keys come from, its algorithms, leeway and token
    lifetime exactly as for a workload issuer, plus the audience its tokens must carry
    (the broker's admin audience, never the workloads'), the claim that names the
    operator and the rules that give a scope. No rule matching: refused."""

    name: str = "operators"
    instance_claim: Any = ("sub",)
    workload_claim: Any = ("sub",)
    replay: Literal["jti_once", "require_jti_once", "off"] = "off"  # a bearer session
    audience: str = Field(min_length=1, max_length=255)
    name_claim: str = Field("email", min_length=1, max_length=128)
    scopes: tuple[ScopeRuleSettings, ...] = Field(min_length=1, max_length=64)

    @model_validator(mode="before")
    @classmethod
    def _operator_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            given = [k for k in _WORKLOAD_ONLY if k in data]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: not used for the operator issuer (an operator is "
                    "named by name_claim, its scope by scopes)"
                )
        return data


class AdminSettings(Frozen):
    """``token_sha256``: the operator ``admin`` (scope admin), as before named operators.
    ``operators``: named static tokens. ``oidc``: the operator issuer. At least one."""

    token_sha256: str | None = None
    operators: tuple[StaticOperatorSettings, ...] = ()
    oidc: OperatorIssuerSettings | None = None

    @field_validator("token_sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return _sha256_hex(v)
        except ValueError:
            raise ValueError(
                "expected the hex SHA-256 of the admin token (64 hex digits)"
            ) from None

    @model_validator(mode="after")
    def _consistent(self) -> AdminSettings:
        if self.token_sha256 is None and not self.operators and self.oidc is None:
            raise ValueError("configure at least one operator: token_sha256, operators or oidc")
        names = [o.name for o in self.static_operators()]
        hashes = [o.token_sha256 for o in self.static_operators()]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            hint = " (token_sha256 is the operator 'admin')" if "admin" in dup else ""
            raise ValueError(f"operator names must be unique; repeated: {', '.join(dup)}{hint}")
        if len(set(hashes)) != len(hashes):
            # Which one would the token be? Never guess: one token, one operator.
            raise ValueError("operators' token_sha256 values must be unique")
        return self

    def static_operators(self) -> tuple[StaticOperatorSettings, ...]:
        """Every static-token operator, the legacy ``token_sha256`` as ``admin``."""
        legacy = (
            (StaticOperatorSettings(name="admin", token_sha256=self.token_sha256, scope="admin"),)
            if self.token_sha256 is not None
            else ()
        )
        return legacy + self.operators
