"""The ``vault`` section: where Vault is, how the broker logs in, and the instance tokens
it creates."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator

from broker.settings import Duration, Frozen, require_tls_off_loopback, seconds
from broker.vault.paths import NAME_SEGMENT

# An instance token is reused only while it outlives a new lease by this much.
TOKEN_REUSE_MARGIN_S = 60


def _name_segment(v: str) -> str:
    if not NAME_SEGMENT.match(v):
        raise ValueError("expected a Vault name (letters, digits, _ . -; no '/')")
    return v


class TokenAuth(Frozen):
    method: Literal["token"] = "token"
    token: SecretStr


class AppRoleAuth(Frozen):
    method: Literal["approle"]
    role_id: str
    secret_id: SecretStr
    mount: str = "approle"


# Where Kubernetes projects a pod's service-account token by default.
KUBERNETES_TOKEN_PATH = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


class KubernetesAuth(Frozen):
    """Log in with the pod's own service-account token (``auth/<mount>/login`` with
    ``role`` and ``jwt``). The file is read afresh at each login: projected tokens rotate."""

    method: Literal["kubernetes"]
    role: str
    mount: str = "kubernetes"
    token_path: Path = KUBERNETES_TOKEN_PATH

    _names = field_validator("role", "mount")(_name_segment)


class JwtAuth(Frozen):
    """Log in with a JWT read from ``token_path`` (e.g. a projected service-account token
    with the Vault audience) at OpenBao/Vault's ``jwt`` auth method."""

    method: Literal["jwt"]
    role: str
    mount: str = "jwt"
    token_path: Path

    _names = field_validator("role", "mount")(_name_segment)


class VaultSettings(Frozen):
    addr: str
    auth: Annotated[
        TokenAuth | AppRoleAuth | KubernetesAuth | JwtAuth, Field(discriminator="method")
    ]
    token_role: str = "broker-instance"
    instance_policies: tuple[str, ...] = ("broker-instance",)
    instance_token_ttl: Duration = 24 * 3600
    timeout_s: float = Field(10.0, gt=0, le=120)
    max_connections: int = Field(64, ge=1, le=1024)
    ca_cert: Path | None = None
    # workload: every instance token is bound to one identity entity per workload, through
    # the entity alias ``<issuer_name>:<workload>`` on the token auth mount (the token role
    # must list it in allowed_entity_aliases). Reading ``identity/oidc/token/<role>`` (the
    # oidc engine, and the aws engine's web_identity mode) needs an entity; one per
    # workload keeps Vault's identity store bounded and gives a stable ``sub`` an IAM
    # trust policy can pin.
    entity_alias: Literal["none", "workload"] = "none"

    _ttl = field_validator("instance_token_ttl", mode="before")(seconds)

    @field_validator("addr")
    @classmethod
    def _http(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+\Z", v.rstrip("/")):
            raise ValueError("expected http(s)://host:port with no path")
        return require_tls_off_loopback(v.rstrip("/"))

    @field_validator("token_role")
    @classmethod
    def _segment(cls, v: str) -> str:
        if not NAME_SEGMENT.match(v):
            raise ValueError("expected a Vault token role name (letters, digits, _ . -)")
        return v
