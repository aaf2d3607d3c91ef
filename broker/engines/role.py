"""A role of the configuration (``roles.<name>``): which engine, mount and Vault role it
uses, its TTLs, the parameters templated from the identity, its lease limit, and (for a
PostgreSQL database role) the read-only login that checks a lost lease's credential
directly. Checked at load against its engine (``broker.engines.validate_role``)."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from broker.engines import ENGINES, validate_role
from broker.settings import Duration, Frozen, seconds, template_fields
from broker.vault.paths import NAME_SEGMENT

# The identity values a role-parameter template may use.
TEMPLATE_FIELDS = frozenset({"instance_id", "workload", "issuer_name"})

# libpq parameters a checker URL's query may not set: they would override the login,
# server or port the URL names (and the log shows), or carry the password.
_URL_ONLY = frozenset({"password", "host", "hostaddr", "port", "user", "service"})


class DatabaseCheck(Frozen):
    """A read-only PostgreSQL login (it only reads ``pg_roles``) with which the broker
    confirms, when Vault no longer knows a lease of this role, whether its database role
    still exists. The password comes apart from the URL (``${ENV}``), so the URL can be
    shown and logged and the password never is."""

    url: str  # postgresql://checker@db.internal:5432/postgres?sslmode=verify-full
    password: SecretStr | None = None
    timeout_s: float = Field(5.0, gt=0, le=60)
    # Optional positive control: a role that exists only on the server the Vault role
    # creates its logins on (e.g. Vault's own account). Not there: wrong server, the
    # check cannot tell (rather than read every login as gone).
    expect_role: str | None = Field(None, min_length=1, max_length=63)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        try:
            parts = urlsplit(v)
            _ = parts.port  # a port that is no number raises here
        except ValueError:
            raise ValueError("expected a URL like postgresql://checker@db:5432/postgres") from None
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError(
                "expected a postgresql:// URL (only PostgreSQL roles can be checked directly)"
            )
        if not parts.hostname:
            raise ValueError("expected a host, e.g. postgresql://checker@db:5432/postgres")
        if parts.password is not None:  # the value is never echoed
            raise ValueError(
                "the URL carries a password: give it as check.password (e.g. "
                "${PG_CHECKER_PASSWORD}), never in the URL, which is logged"
            )
        if not parts.username:
            raise ValueError("expected a user, e.g. postgresql://checker@db:5432/postgres")
        if "," in parts.netloc:
            raise ValueError("expected one host: the server the Vault role's logins live on")
        given = {key.lower() for key, _ in parse_qsl(parts.query, keep_blank_values=True)}
        overriding = sorted(given & _URL_ONLY)
        if overriding:  # names only: a value (a password) is never echoed
            raise ValueError(
                f"the URL's query sets {', '.join(overriding)}: the login, host and port "
                "are the URL's own (they are logged as the checker), the password is "
                "check.password"
            )
        return v

    @property
    def where(self) -> str:
        """The login and server, for a log line (no password: the URL has none)."""
        parts = urlsplit(self.url)
        return f"{parts.username}@{parts.hostname}:{parts.port or 5432}"


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
    # database engine, PostgreSQL only: how to confirm directly that a lost lease's login
    # is gone (see broker.engines.checks). PKI roles need nothing: the CRL is public.
    check: DatabaseCheck | None = None

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
        if self.check is not None and self.engine != "database":
            raise ValueError(
                "check: only a database role takes a direct check (a PKI certificate is "
                "checked against its mount's CRL with no setting)"
            )
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
