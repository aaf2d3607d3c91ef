"""The injector's own configuration (``broker injector --config FILE``), loaded by
``broker.config.load_yaml_model``. Every key has a documented default, so the injector
runs with no file at all (``--broker-url`` names the broker the agents call)."""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from broker.injector.images import ImageDigests, by_digest
from broker.injector.quantity import parse_quantity
from broker.settings import NAME, Frozen, require_tls_off_loopback

# Where the agent finds its projected service-account token (its own volume, never the
# default API token's mount).
TOKEN_DIR = "/var/run/secrets/ephemeral-broker"
_LISTEN = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>[0-9]{1,5})\Z"
)
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}\Z")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8443`` for IPv6) as a host and a port; ``ValueError``."""
    match = _LISTEN.match(text)
    port = int(match.group("port")) if match else -1
    if match is None or not 0 <= port <= 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 0.0.0.0:8443 or [::1]:8443), got {text!r}")
    return match.group("v6") or match.group("host"), port


def _absolute_path(value: str) -> str:
    if not value.startswith("/") or posixpath.normpath(value) != value or value == "/":
        raise ValueError(f"expected a normalized absolute path other than /, got {value!r}")
    return value


class TlsSettings(Frozen):
    cert_file: Path = Path("/etc/injector/tls/tls.crt")
    key_file: Path = Path("/etc/injector/tls/tls.key")
    # cert-manager rewrites the secret's files in place: their mtimes are polled this often
    # and new handshakes get the new certificate.
    reload_s: float = Field(10, ge=0.05, le=3600)


class PreviewSettings(Frozen):
    broker_url: str | None = None  # default: the top-level broker_url
    token_file: Path = Path("/var/run/secrets/injector/admin-token")
    ca_file: Path | None = None  # CA bundle for the broker's TLS (None: the system's)
    # The webhook's own timeoutSeconds must leave room for this: an unreachable broker
    # costs a warning, never the pod.
    timeout_s: float = Field(2, gt=0, le=10)

    @field_validator("broker_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return None if v is None else _broker_url(v)


class Amounts(Frozen):
    cpu: str
    memory: str

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, v: str) -> str:
        parse_quantity(v)
        return v


class AgentResources(Frozen):
    requests: Amounts = Amounts(cpu="10m", memory="32Mi")
    limits: Amounts = Amounts(cpu="100m", memory="64Mi")

    @model_validator(mode="after")
    def _request_within_limit(self) -> AgentResources:
        for kind in ("cpu", "memory"):
            if parse_quantity(getattr(self.requests, kind)) > parse_quantity(
                getattr(self.limits, kind)
            ):
                raise ValueError(f"requests.{kind} must not exceed limits.{kind}")
        return self


class AgentSettings(Frozen):
    image: str = "ghcr.io/example/ephemeral-broker:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    run_as_user: int = Field(65532, ge=1, le=2**31 - 1)
    ready_port: int = Field(8399, ge=1, le=65535)
    mount_path: str = "/var/run/ephemeral-broker"
    # A file in the injector's pod: the CA the broker's serving certificate chains to.
    # The injector reads it (again when it changes) and passes its certificates to each
    # agent as --ca-pem; None: the agents trust the system's CAs.
    ca_file: str | None = None
    exit_timeout_s: int = Field(20, ge=1, le=600)
    # How long the native agent may take to write every file before the kubelet gives up
    # on it (the startup probe's window; see broker.injector.containers).
    startup_timeout_s: int = Field(900, ge=30, le=86400)
    resources: AgentResources = AgentResources()

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        if not _IMAGE.match(v):
            raise ValueError("expected an image reference like registry/name:tag")
        return v

    @field_validator("mount_path")
    @classmethod
    def _mount_path(cls, v: str) -> str:
        _absolute_path(v)
        if v == TOKEN_DIR or v.startswith(TOKEN_DIR + "/") or TOKEN_DIR.startswith(v + "/"):
            raise ValueError(f"must not overlap the agent's token directory {TOKEN_DIR}")
        return v

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, v: str | None) -> str | None:
        return None if v is None else _absolute_path(v)


def _broker_url(v: str) -> str:
    if not re.match(r"^https?://[^\s/?#]+(?:/[^\s?#]*)?\Z", v):
        raise ValueError("expected an http(s) URL like https://broker.namespace.svc:8300")
    return require_tls_off_loopback(v.rstrip("/"))


class InjectorSettings(Frozen):
    listen: str = "0.0.0.0:8443"
    tls: TlsSettings = TlsSettings()
    broker_url: str = "https://ephemeral-broker.ephemeral-broker.svc:8300"
    preview: PreviewSettings | None = None
    issuer: str | None = None  # the broker's issuer name for this cluster's projected tokens
    audience: str = Field("ephemeral-broker", min_length=1, max_length=253)
    token_expiration_s: int = Field(600, ge=600, le=86400)
    strict: bool = False
    skip_namespaces: tuple[str, ...] = ("kube-system", "kube-public")
    # Opted-in pods whose containers name an image by tag instead of by digest: admitted
    # as before ("off"), admitted with a warning ("warn"), or refused ("refuse").
    image_digests: ImageDigests = "off"
    agent: AgentSettings = AgentSettings()
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v

    @field_validator("broker_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _broker_url(v)

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str | None) -> str | None:
        if v is not None and not NAME.match(v):
            raise ValueError("expected the broker's issuer name (lower-case letters, digits, _ -)")
        return v

    @model_validator(mode="after")
    def _preview_needs_issuer(self) -> InjectorSettings:
        if self.preview is not None and self.issuer is None:
            raise ValueError(
                "issuer: required with preview (the broker maps the pod's claims with "
                "that issuer's claim mapping)"
            )
        if self.strict and self.preview is None:
            raise ValueError("strict: needs the preview section (strict refuses what it refuses)")
        if self.image_digests != "off" and not by_digest(self.agent.image):
            raise ValueError(
                f"agent.image: image_digests is {self.image_digests!r}, so the agent's own "
                "image must be pinned by digest too (registry/name@sha256:DIGEST)"
            )
        return self

    @property
    def preview_url(self) -> str:
        if self.preview is not None and self.preview.broker_url is not None:
            return self.preview.broker_url
        return self.broker_url
