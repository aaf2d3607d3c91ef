"""Typed, frozen settings loaded once at start-up from YAML (plus ``${ENV}`` references).

Nothing deeper in the broker reads the environment or a file for configuration: every
component receives the part of ``Settings`` it needs. A bad file stops start-up with the
path of the offending key and what was expected.
"""

from __future__ import annotations

import ipaddress
import os
import re
import string
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from broker.durations import parse_duration
from broker.errors import ConfigError

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
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")
_VAULT_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# The identity values a role-parameter template may use.
TEMPLATE_FIELDS = frozenset({"instance_id", "workload", "issuer_name"})
# The claim that makes a pod's uid the instance id (the kubernetes kind's default).
POD_UID_CLAIM = ("kubernetes.io", "pod", "uid")
# The shortest liveness.unseen_grace: sightings reach the store every few seconds.
MIN_UNSEEN_GRACE_S = 60
# An instance token is reused only while it outlives a new lease by this much.
TOKEN_REUSE_MARGIN_S = 60


def _loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_tls_off_loopback(url: str) -> str:
    """Plain http only to this machine: a JWKS fetched in clear text lets anyone on the
    path inject signing keys, and the broker's Vault token would travel in clear text."""
    if url.startswith("http://") and not _loopback(url):
        raise ValueError("expected https:// (plain http is allowed only to a loopback address)")
    return url


@lru_cache(maxsize=1024)
def template_fields(template: str) -> frozenset[str]:
    """Names a role-parameter template refers to. Only plain ``{name}`` fields: no
    conversion, format spec, attribute or index, which could not be validated."""
    names = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        raise ValueError("malformed template (unbalanced braces)") from None
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if spec or conv or not name.isidentifier():
            raise ValueError(f"template field {{{name}}} must be a plain name like {{workload}}")
        names.add(name)
    return frozenset(names)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _seconds(value: Any) -> int:
    return parse_duration(value)


Duration = Annotated[int, Field(ge=0)]


class ServerSettings(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8300, ge=0, le=65535)
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)


class StoreSettings(_Frozen):
    url: str = "sqlite:///broker.db"
    pool_size: int = Field(20, ge=1, le=200)
    connect_timeout_s: float = Field(5.0, gt=0, le=60)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if not (v.startswith("sqlite://") or v.startswith("postgresql")):
            raise ValueError("expected a sqlite:///PATH or postgresql://… URL")
        return v


class TokenAuth(_Frozen):
    method: Literal["token"] = "token"
    token: SecretStr


class AppRoleAuth(_Frozen):
    method: Literal["approle"]
    role_id: str
    secret_id: SecretStr
    mount: str = "approle"


class VaultSettings(_Frozen):
    addr: str
    auth: Annotated[TokenAuth | AppRoleAuth, Field(discriminator="method")]
    token_role: str = "broker-instance"
    instance_policies: tuple[str, ...] = ("broker-instance",)
    instance_token_ttl: Duration = 24 * 3600
    timeout_s: float = Field(10.0, gt=0, le=120)
    max_connections: int = Field(64, ge=1, le=1024)
    ca_cert: Path | None = None
    # workload: every instance token is bound to one identity entity per workload, through
    # the entity alias ``<issuer_name>:<workload>`` on the token auth mount (the token role
    # must list it in allowed_entity_aliases). Reading ``identity/oidc/token/<role>`` (the
    # aws engine's web_identity mode) needs an entity; one per workload keeps Vault's
    # identity store bounded and gives a stable ``sub`` an IAM trust policy can pin.
    entity_alias: Literal["none", "workload"] = "none"

    _ttl = field_validator("instance_token_ttl", mode="before")(_seconds)

    @field_validator("addr")
    @classmethod
    def _http(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+\Z", v.rstrip("/")):
            raise ValueError("expected http(s)://host:port with no path")
        return require_tls_off_loopback(v.rstrip("/"))

    @field_validator("token_role")
    @classmethod
    def _segment(cls, v: str) -> str:
        if not _VAULT_SEGMENT.match(v):
            raise ValueError("expected a Vault token role name (letters, digits, _ . -)")
        return v


class AwsDefaultChain(_Frozen):
    """The AWS SDK's standard chain: environment, shared files, web identity, container
    and instance roles. The one place the broker's AWS credentials come from outside
    this file, by design of the chain."""

    method: Literal["chain"] = "chain"


class AwsStaticKeys(_Frozen):
    method: Literal["static"]
    access_key_id: str = Field(min_length=16, max_length=128, pattern=r"^[A-Za-z0-9_]+$")
    secret_access_key: SecretStr
    session_token: SecretStr | None = None


_AWS_REGION = re.compile(r"^[a-z]{2,4}(-[a-z]+)+-\d{1,2}\Z")
_IAM_NAME = re.compile(r"^[A-Za-z0-9+=,.@_-]{1,128}\Z")


def _aws_region(v: str) -> str:
    if not _AWS_REGION.match(v):
        raise ValueError("expected an AWS region such as us-east-1")
    return v


def _endpoint(v: str | None) -> str | None:
    if v is None:
        return v
    if not re.match(r"^https?://[^/\s?#]+/?\Z", v):
        raise ValueError("expected http(s)://host[:port] with no path")
    return require_tls_off_loopback(v.rstrip("/"))


class AwsSettings(_Frozen):
    """The broker's own access to AWS: STS for web-identity exchanges (unsigned), IAM for
    the deny policy that stands in for revoking an STS session (signed, with these
    credentials; they need iam:GetRole, iam:GetRolePolicy and iam:PutRolePolicy on the
    roles the broker's web_identity roles assume)."""

    region: str = "us-east-1"
    sts_endpoint: str | None = None  # default https://sts.<region>.amazonaws.com
    iam_endpoint: str | None = None  # default the SDK's (https://iam.amazonaws.com)
    ec2_endpoint: str | None = None  # the aws_ec2 liveness check; default the SDK's
    credentials: Annotated[AwsDefaultChain | AwsStaticKeys, Field(discriminator="method")] = (
        AwsDefaultChain()
    )
    timeout_s: float = Field(10.0, gt=0, le=120)
    iam_concurrency: int = Field(4, ge=1, le=32)  # threads for the (synchronous) IAM SDK
    # The inline policy on each IAM role that holds the denies of revoked sessions.
    revoked_sessions_policy: str = "broker-revoked-sessions"

    _endpoints = field_validator("sts_endpoint", "iam_endpoint", "ec2_endpoint")(_endpoint)

    _region = field_validator("region")(_aws_region)

    @field_validator("revoked_sessions_policy")
    @classmethod
    def _policy_name(cls, v: str) -> str:
        if not _IAM_NAME.match(v):
            raise ValueError("expected an IAM policy name (letters, digits, + = , . @ _ -)")
        return v

    @property
    def sts_url(self) -> str:
        return self.sts_endpoint or f"https://sts.{self.region}.amazonaws.com"


class LivenessSettings(_Frozen):
    """How the broker learns that an instance of an issuer is still alive.

    ``check``: ``kubernetes`` asks the API server for the pod the token names (namespace and
    pod name claims) and compares its uid; ``aws_ec2`` asks EC2 for the instance's state.
    ``unseen_grace``: an active instance that neither exchanged nor renewed for this long is
    treated as terminated (0: never)."""

    check: Literal["none", "kubernetes", "aws_ec2"] = "none"
    unseen_grace: Duration = 0
    # How long a liveness answer is reused for the same instance.
    cache_s: float = Field(10.0, ge=0, le=3600)

    _grace = field_validator("unseen_grace", mode="before")(_seconds)

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


def _claim_path(value: Any) -> ClaimPath:
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(p, str) and p for p in value)
    ):
        raise ValueError("expected a claim name or a list of nested claim names")
    return tuple(value)


class ClaimJoin(_Frozen):
    """Several claims joined into one value, e.g. a CI run id and its attempt."""

    join: tuple[ClaimPath, ...] = Field(min_length=1, max_length=8)
    separator: Literal[":", "/", "-", ".", "_"] = ":"

    @field_validator("join", mode="before")
    @classmethod
    def _paths(cls, v: Any) -> Any:
        if not isinstance(v, list | tuple):
            raise ValueError("expected a list of claim paths")
        return tuple(_claim_path(p) for p in v)


ClaimSpec = ClaimPath | ClaimJoin


def _claim_spec(value: Any) -> Any:
    if value is None or isinstance(value, ClaimJoin):
        return value
    if isinstance(value, dict):
        return ClaimJoin.model_validate(value)
    return _claim_path(value)


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


class IssuerSettings(_Frozen):
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

    _lifetime = field_validator("max_token_lifetime", mode="before")(_seconds)
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
        if not _NAME.match(v):
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


class IdentitySettings(_Frozen):
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


class RoleSettings(_Frozen):
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

    _ttls = field_validator("default_ttl", "max_ttl", mode="before")(_seconds)

    @field_validator("mount", "vault_role")
    @classmethod
    def _segment(cls, v: str) -> str:
        if not _VAULT_SEGMENT.match(v) or ".." in v:
            raise ValueError("expected one Vault path segment (letters, digits, _ . -)")
        return v

    @model_validator(mode="after")
    def _params(self) -> RoleSettings:
        from broker.engines import ENGINES, validate_role  # engines import this module

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


class ClaimMatch(_Frozen):
    """One condition of a rule. ``claim`` is a path into the verified claims; ``identity``
    names a mapped identity field (``instance_id``, ``workload``, ``subject``). Exactly one
    of ``exact``, ``glob``, ``regex``, ``one_of`` says how to compare."""

    claim: ClaimPath | None = None
    identity: Literal["instance_id", "workload", "subject"] | None = None
    exact: str | None = None
    glob: str | None = None
    regex: str | None = None
    one_of: tuple[str, ...] | None = None

    @field_validator("claim", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        return None if v is None else _claim_path(v)

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"regex does not compile: {exc}") from None
        return v

    @model_validator(mode="after")
    def _one_each(self) -> ClaimMatch:
        if (self.claim is None) == (self.identity is None):
            raise ValueError("set exactly one of 'claim' or 'identity'")
        ops = [x for x in (self.exact, self.glob, self.regex, self.one_of) if x is not None]
        if len(ops) != 1:
            raise ValueError("set exactly one of 'exact', 'glob', 'regex', 'one_of'")
        return self


class Rule(_Frozen):
    name: str
    issuer: str | None = None
    match: tuple[ClaimMatch, ...] = ()
    allow: tuple[str, ...] = Field(min_length=1)
    max_ttl: Annotated[int, Field(ge=1)] | None = None

    _ttl = field_validator("max_ttl", mode="before")(
        lambda v: None if v is None else parse_duration(v)
    )


class PolicySettings(_Frozen):
    rules: tuple[Rule, ...] = ()


class AdminSettings(_Frozen):
    token_sha256: str

    @field_validator("token_sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        v = v.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("expected the hex SHA-256 of the admin token (64 hex digits)")
        return v


class RevocationSettings(_Frozen):
    tick_s: float = Field(1.0, gt=0, le=300)
    batch: int = Field(8, ge=1, le=256)
    claim_timeout_s: int = Field(120, ge=5, le=3600)
    backoff_base_s: float = Field(1.0, gt=0, le=600)
    backoff_max_s: float = Field(300.0, gt=0, le=86400)
    max_attempts: int = Field(12, ge=1, le=1000)
    issuing_timeout_s: int = Field(120, ge=5, le=3600)


class ReconcileSettings(_Frozen):
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


class WebhookSettings(_Frozen):
    """``POST /v1/events/terminate``: an HMAC-SHA256 signature over ``<timestamp>.<body>``
    with one of ``secrets`` (several, to rotate); a timestamp outside ``window_s`` of the
    broker's clock is refused, and a signature is accepted once."""

    secrets: tuple[SecretStr, ...] = Field(min_length=1, max_length=8)
    window_s: int = Field(300, ge=10, le=3600)
    max_instances: int = Field(100, ge=1, le=1000)

    @field_validator("secrets")
    @classmethod
    def _long_enough(cls, v: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        if any(len(x.get_secret_value()) < 32 for x in v):
            raise ValueError("each webhook secret must be at least 32 characters")
        return v


class SqsEventSettings(_Frozen):
    """EventBridge "EC2 Instance State-change Notification" messages in an SQS queue."""

    queue_url: str
    region: str = "us-east-1"
    endpoint: str | None = None  # default the SDK's
    credentials: Annotated[AwsDefaultChain | AwsStaticKeys, Field(discriminator="method")] = (
        AwsDefaultChain()
    )
    wait_time_s: int = Field(20, ge=0, le=20)  # SQS long polling
    max_messages: int = Field(10, ge=1, le=10)
    visibility_timeout_s: int = Field(60, ge=5, le=43200)
    states: tuple[str, ...] = ("shutting-down", "terminated")
    # The broker's instance id for an EC2 instance: fields instance_id, account, region.
    instance_id_format: str = "{instance_id}"
    # The issuer whose instances these are: an instance owned by another issuer is left alone.
    issuer: str | None = None

    _endpoints = field_validator("endpoint")(_endpoint)

    @field_validator("queue_url")
    @classmethod
    def _queue(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+/\d{12}/[A-Za-z0-9_-]{1,80}(\.fifo)?\Z", v):
            raise ValueError(
                "expected an SQS queue URL like https://sqs.REGION.amazonaws.com/ACCOUNT/NAME"
            )
        return require_tls_off_loopback(v)

    _region = field_validator("region")(_aws_region)

    @field_validator("states")
    @classmethod
    def _states(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        known = ("pending", "running", "stopping", "stopped", "shutting-down", "terminated")
        if not v or set(v) - set(known):
            raise ValueError(f"expected EC2 instance states among {', '.join(known)}")
        return v

    @field_validator("instance_id_format")
    @classmethod
    def _format(cls, v: str) -> str:
        unknown = template_fields(v) - {"instance_id", "account", "region"}
        if unknown or "instance_id" not in template_fields(v):
            raise ValueError(
                "expected a template with {instance_id}, and optionally {account} and {region}"
            )
        return v


class KubernetesSettings(_Frozen):
    """The Kubernetes API server: for the pod watch (termination on deletion) and for the
    ``kubernetes`` liveness check. In a pod, the defaults are the in-cluster ones."""

    api_url: str = "https://kubernetes.default.svc"
    token_file: Path | None = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    ca_file: Path | None = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    timeout_s: float = Field(10.0, gt=0, le=120)
    # The watch: off unless enabled; namespace None watches every namespace.
    watch: bool = False
    namespace: str | None = None
    label_selector: str | None = None
    # The issuer whose instances pods are (its instance id is the pod uid).
    issuer: str | None = None

    @field_validator("api_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+/?\Z", v):
            raise ValueError("expected http(s)://host[:port] with no path")
        return require_tls_off_loopback(v.rstrip("/"))


class EventSettings(_Frozen):
    webhook: WebhookSettings | None = None
    sqs: SqsEventSettings | None = None


class Settings(_Frozen):
    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    vault: VaultSettings
    identity: IdentitySettings
    roles: dict[str, RoleSettings] = Field(min_length=1)
    policy: PolicySettings = PolicySettings()
    admin: AdminSettings
    revocation: RevocationSettings = RevocationSettings()
    aws: AwsSettings | None = None  # needed by aws roles that deal with STS themselves
    reconcile: ReconcileSettings = ReconcileSettings()
    events: EventSettings = EventSettings()
    kubernetes: KubernetesSettings | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _references(self) -> Settings:
        issuer_names = {i.name for i in self.identity.issuers}
        for name in self.roles:
            if not _NAME.match(name):
                raise ValueError(f"role name {name!r}: expected lower-case letters, digits, _ or -")
        longest = max(r.max_ttl for r in self.roles.values())
        if longest + TOKEN_REUSE_MARGIN_S > self.vault.instance_token_ttl:
            raise ValueError(
                "vault.instance_token_ttl must exceed the longest role max_ttl "
                f"({longest}s) by at least {TOKEN_REUSE_MARGIN_S}s: a lease cannot outlive "
                "the instance token it was read with"
            )
        self._engine_needs()
        pod_uid_issuers = {
            i.name for i in self.identity.issuers if i.instance_claim == POD_UID_CLAIM
        }
        for idx, iss in enumerate(self.identity.issuers):
            if iss.liveness.check == "kubernetes" and self.kubernetes is None:
                raise ValueError(
                    f"identity.issuers.{idx}.liveness.check: kubernetes needs the "
                    "kubernetes section (the API server to ask)"
                )
            if iss.liveness.check == "kubernetes" and iss.name not in pod_uid_issuers:
                raise ValueError(
                    f"identity.issuers.{idx}.liveness.check: kubernetes compares the pod's "
                    "uid with the instance id, so instance_claim must be "
                    "[kubernetes.io, pod, uid]"
                )
            if iss.liveness.check == "aws_ec2" and self.aws is None:
                raise ValueError(
                    f"identity.issuers.{idx}.liveness.check: aws_ec2 needs the aws section"
                )
        if self.kubernetes is not None and self.kubernetes.watch and not self.kubernetes.issuer:
            raise ValueError(
                "kubernetes.issuer: required with watch: true (the issuer whose instances "
                "pods are; only its instances are terminated)"
            )
        if (
            self.kubernetes is not None
            and self.kubernetes.watch
            and self.kubernetes.issuer in issuer_names
            and self.kubernetes.issuer not in pod_uid_issuers
        ):
            raise ValueError(
                "kubernetes.issuer: the watch terminates instances by pod uid, so the "
                "issuer's instance_claim must be [kubernetes.io, pod, uid]"
            )
        for where, named in (
            ("events.sqs.issuer", self.events.sqs.issuer if self.events.sqs else None),
            ("kubernetes.issuer", self.kubernetes.issuer if self.kubernetes else None),
        ):
            if named is not None and named not in issuer_names:
                raise ValueError(f"{where}: unknown issuer {named!r}")
        for idx, rule in enumerate(self.policy.rules):
            for role in rule.allow:
                if role not in self.roles:
                    raise ValueError(f"policy.rules.{idx}.allow: unknown role {role!r}")
            if rule.issuer is not None and rule.issuer not in issuer_names:
                raise ValueError(f"policy.rules.{idx}.issuer: unknown issuer {rule.issuer!r}")
            if rule.issuer is None and len(issuer_names) > 1:
                # Workload names of different issuers can look alike (a namespace/sa and
                # an owner/repo): a rule must say whose tokens it is about.
                raise ValueError(
                    f"policy.rules.{idx}.issuer: required when more than one issuer is configured"
                )
        return self

    def _engine_needs(self) -> None:
        from broker.engines.aws import needs  # engines import this module

        for name, role in self.roles.items():
            wanted = needs(role)
            if "aws" in wanted and self.aws is None:
                raise ValueError(
                    f"aws: role {name!r} exchanges tokens at AWS STS or denies its sessions "
                    "in IAM on termination; configure the aws section"
                )
            if "entity" in wanted and self.vault.entity_alias == "none":
                raise ValueError(
                    f"vault.entity_alias: role {name!r} reads an OIDC token from Vault's "
                    "identity engine, which needs the instance token to have an entity; "
                    "set entity_alias: workload"
                )


def _expand_env(node: Any, path: str, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else str(k), env) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, f"{path}.{i}", env) for i, v in enumerate(node)]
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in env:
                raise ConfigError(f"{path}: environment variable {name} is not set")
            return env[name]

        return _ENV_REF.sub(sub, node)
    return node


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    errors = exc.errors()
    deeper = [tuple(e["loc"]) for e in errors]
    for err in errors:
        loc_t = tuple(err["loc"])
        if err["type"] == "too_short" and any(
            other[: len(loc_t)] == loc_t and other != loc_t for other in deeper
        ):
            continue  # a list came out short only because one of its items was refused
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def load_settings(
    data: dict[str, Any], *, source: str = "config", env: dict[str, str] | None = None
) -> Settings:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    expanded = _expand_env(data, "", dict(os.environ) if env is None else env)
    try:
        return Settings.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def load_settings_file(path: str | Path, *, env: dict[str, str] | None = None) -> Settings:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML") from None
    if data is None:
        data = {}
    return load_settings(data, source=str(path), env=env)
