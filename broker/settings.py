"""What every domain's settings are made of: a frozen pydantic model that refuses unknown
keys, durations, and the checks several sections share. A leaf: the domains import it,
``broker.config`` puts their sections together.
"""

from __future__ import annotations

import ipaddress
import re
import string
from functools import lru_cache
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from broker.durations import parse_duration

# A name the configuration gives to a role or an issuer.
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (``127.0.0.1``, ``::1``); brackets allowed."""
    host = host.lower().removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_tls_off_loopback(url: str) -> str:
    """Plain http only to this machine: a JWKS fetched in clear text lets anyone on the
    path inject signing keys, and the broker's Vault token would travel in clear text."""
    if url.startswith("http://") and not is_loopback(urlsplit(url).hostname or ""):
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


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def seconds(value: Any) -> int:
    return parse_duration(value)


Duration = Annotated[int, Field(ge=0)]
