"""Vault path segments: which names may become one, and how they are joined.

A leaf shared by the configuration (mount and role names are checked at load), the
engines (which build the paths) and the client.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from broker.errors import UpstreamRejected

# A mount or role name as the configuration gives it.
NAME_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
# Any segment a path is built from (an identity value too): no '/', never '..'.
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,255}\Z")


def vault_path(*segments: str) -> str:
    """Join validated, escaped path segments. A segment can never climb or add a level."""
    for seg in segments:
        if not _SEGMENT.match(seg) or ".." in seg:
            raise UpstreamRejected("a Vault path segment is not allowed", code="vault_path_refused")
    return "/".join(quote(s, safe="") for s in segments)
