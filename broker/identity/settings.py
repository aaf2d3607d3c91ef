"""The ``identity`` section: the audience, and per issuer where its keys come from, which
algorithms it signs with, where the instance id and workload are in its tokens, and how
its instances' liveness is checked.

The liveness settings are an issuer's, so they live here: ``broker.liveness`` takes the
verified ``Identity`` from this package, and would make a cycle of the two otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from broker.settings import NAME, Duration, Frozen, require_tls_off_loopback, seconds

ALLOWED_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "EdDSA",
)
MAX_LEEWAY_SECONDS = 60
# The claim that makes a pod's uid the instance id (the kubernetes kind's default).
POD_UID_CLAIM = ("kubernetes.io", "pod", "uid")
# The shortest liveness.unseen_grace: sightings reach their ledger every few seconds.
MIN_UNSEEN_GRACE_S = 60


class LivenessSettings(Frozen):
    """How the broker learns that an instance of an issuer is still alive.

    ``check``: ``kubernetes`` asks the API server for the pod the token names (namespace and
    pod name claims) and compares its uid; ``aws_ec2`` asks EC2 for the instance's state.
    ``unseen_grace``: an active instance that neither exchanged nor renewed for this long is
    treated as terminated (0: never)."""

    check: Literal["none", "kubernetes", "aws_ec2"] = "none"
    unseen_grace: Duration = 0
    # How long a liveness answer is reused for the same instance.
    cache_s: float = Field(10.0, ge=0, le=3600)

    _grace = field_validator("unseen_grace", mode="before")(seconds)

    @field_validator("unseen_grace")
    @classmethod
    def _grace_floor(cls, v: int) -> int:
        if 0 < v < MIN_UNSEEN_GRACE_S:
            raise ValueError(
                f"expected 0 (off) or at least {MIN_UNSEEN_GRACE_S}s: replicas record "
                "sightings in batches, so a shorter grace would terminate live instances"
            )
        return v


ClaimPath = tuple[str, ...]


def claim_path(value: Any) -> ClaimPath:
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(p, str) and p for p in value)
    ):
        raise ValueError("expected a claim name or a list of nested claim names")
    return tuple(value)


class ClaimJoin(Frozen):
    """Several claims joined into one value, e.g. a CI run id and its attempt."""

    join: tuple[ClaimPath, ...] = Field(min_length=1, max_length=8)
    separator: Literal[":", "/", "-", ".", "_"] = ":"

    @field_validator("join", mode="before")
    @classmethod
    def _paths(cls, v: Any) -> Any:
        if not isinstance(v, list | tuple):
            raise ValueError("expected a list of claim paths")
        return tuple(claim_path(p) for p in v)


ClaimSpec = ClaimPath | ClaimJoin


def _claim_spec(value: Any) -> Any:
    if value is None or isinstance(value, ClaimJoin):
        return value
    if isinstance(value, dict):
        return ClaimJoin.model_validate(value)
    return claim_path(value)


IssuerKind = Literal["generic", "kubernetes", "spiffe", "github_actions", "gcp"]

# What each kind of issuer's tokens look like: where the instance id and the workload
# name are, unless the configuration says otherwise.
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    # Projected, audience-bound service-account tokens: one pod = one instance.
    "kubernetes": {
        "instance_claim": ("kubernetes.io", "pod", "uid"),
        "workload_claim": {
            "join": [["kubernetes.io", "namespace"], ["kubernetes.io", "serviceaccount", "name"]],
            "separator": "/",
        },
        # The kubelet hands a pod the same token for most of its life, and a pod asks
        # for several credentials: one exchange per jti would refuse its second request.
        "replay": "off",
    },
    # JWT-SVIDs: the SPIFFE ID names the workload. Every replica usually shares it, so
    # there is no default instance claim: say which claim tells replicas apart (or `sub`
    # where each replica has its own SPIFFE ID).
    "spiffe": {"workload_claim": ("sub",)},
    # GitHub Actions OIDC: one run attempt = one instance. The workload is the owner and
    # repository *ids*: a renamed or deleted repository's name can be registered again.
    "github_actions": {
        "instance_claim": {"join": [["run_id"], ["run_attempt"]], "separator": "-"},
        "workload_claim": {"join": [["repository_owner_id"], ["repository_id"]], "separator": ":"},
    },
    # GCP compute identity tokens (format=full): one VM = one instance, scoped to its
    # project (instance ids are not unique across projects).
    "gcp": {
        "instance_claim": {
            "join": [
                ["google", "compute_engine", "project_id"],
                ["google", "compute_engine", "instance_id"],
            ],
            "separator": ":",
        },
        "workload_claim": ("email",),
    },
}
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}\Z")


class IssuerSettings(Frozen):
    name: str
    issuer: str
    kind: IssuerKind = "generic"
    # Where the keys come from: exactly one of these.
    jwks_uri: str | None = None
    discovery: bool = False  # <issuer>/.well-known/openid-configuration → jwks_uri
    jwks_file: Path | None = None
    spiffe_bundle_uri: str | None = None
    trust_domain: str | None = None  # spiffe: the only trust domain this issuer vouches for
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    # Required for a generic issuer, not defaulted to `sub`: `sub` often names a service
    # account shared by every pod, which would make all of them one instance.
    instance_claim: ClaimSpec
    workload_claim: ClaimSpec
    leeway_s: int = Field(30, ge=0, le=MAX_LEEWAY_SECONDS)
    max_token_lifetime: Duration = 3600
    max_token_bytes: int = Field(16 * 1024, ge=512, le=64 * 1024)
    jwks_cache_ttl_s: int = Field(300, ge=1, le=86400)
    jwks_refresh_cooldown_s: float = Field(30.0, ge=0, le=3600)
    jwks_stale_max_s: int = Field(3600, ge=0, le=7 * 86400)
    jwks_max_bytes: int = Field(256 * 1024, ge=1024, le=4 * 1024 * 1024)
    jwks_timeout_s: float = Field(5.0, gt=0, le=60)
    # jti_once: a token carrying a jti is good for one exchange; require_jti_once: and a
    # token without one is refused; off: no replay record (tokens stay bound to their
    # instance, their lifetime and the tombstone).
    replay: Literal["jti_once", "require_jti_once", "off"] = "jti_once"
    # Liveness of this issuer's instances: checked before a renewal (an instance confirmed
    # gone is terminated instead of renewed), and an instance unseen for a grace period is
    # terminated by the reconciler.
    liveness: LivenessSettings = LivenessSettings()

    _lifetime = field_validator("max_token_lifetime", mode="before")(seconds)
    _specs = field_validator("instance_claim", "workload_claim", mode="before")(_claim_spec)

    @field_validator("replay", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML reads an unquoted `off` as false

    @model_validator(mode="before")
    @classmethod
    def _kind_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") in KIND_DEFAULTS:
            data = {**KIND_DEFAULTS[data["kind"]], **data}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v):
            raise ValueError("expected lower-case letters, digits, _ or -")
        return v

    @field_validator("algorithms")
    @classmethod
    def _algs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [a for a in v if a not in ALLOWED_ALGORITHMS]
        if bad or not v:
            raise ValueError(
                f"expected a non-empty list from {', '.join(ALLOWED_ALGORITHMS)}; "
                f"refused: {', '.join(bad) or 'empty list'}"
            )
        return v

    @field_validator("jwks_uri", "spiffe_bundle_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not re.match(r"^https?://", v):
            raise ValueError("expected an http(s) URL")
        return require_tls_off_loopback(v)

    @field_validator("trust_domain")
    @classmethod
    def _td(cls, v: str | None) -> str | None:
        if v is not None and not _TRUST_DOMAIN.match(v):
            raise ValueError("expected a SPIFFE trust domain (lower-case letters, digits, . _ -)")
        return v

    @model_validator(mode="after")
    def _one_key_source(self) -> IssuerSettings:
        sources = [
            name
            for name, on in (
                ("jwks_uri", self.jwks_uri is not None),
                ("discovery", self.discovery),
                ("jwks_file", self.jwks_file is not None),
                ("spiffe_bundle_uri", self.spiffe_bundle_uri is not None),
            )
            if on
        ]
        if len(sources) != 1:
            raise ValueError(
                "set exactly one key source: jwks_uri, discovery: true, jwks_file or "
                f"spiffe_bundle_uri (got {', '.join(sources) or 'none'})"
            )
        if self.discovery:
            if not re.match(r"^https?://", self.issuer):
                raise ValueError("discovery needs an http(s) issuer URL")
            require_tls_off_loopback(self.issuer)
        if self.kind == "spiffe" and self.trust_domain is None:
            raise ValueError("a spiffe issuer needs trust_domain")
        if self.kind != "spiffe" and self.trust_domain is not None:
            raise ValueError("trust_domain applies to kind: spiffe only")
        return self

    @property
    def key_source(self) -> str:
        if self.jwks_file is not None:
            return "file"
        if self.discovery:
            return "discovery"
        if self.spiffe_bundle_uri is not None:
            return "spiffe_bundle"
        return "jwks_uri"


class IdentitySettings(Frozen):
    audience: str = Field(min_length=1)
    issuers: tuple[IssuerSettings, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> IdentitySettings:
        names = [i.name for i in self.issuers]
        issuers = [i.issuer for i in self.issuers]
        if len(set(names)) != len(names):
            raise ValueError("issuer names must be unique")
        if len(set(issuers)) != len(issuers):
            raise ValueError("issuer 'issuer' values must be unique")
        return self
