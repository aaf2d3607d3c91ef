"""The ``kubernetes`` section: the API server, and whether the pod watch runs."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator

from broker.settings import Frozen, require_tls_off_loopback


class KubernetesSettings(Frozen):
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
