"""Which of an identity's verified claims the broker records on its instance at first
issuance (``instances.claims``), so that an incident responder can select instances by a
claim (``brokerctl revoke --claim team=payments``).

Recorded: top-level claims whose value is a string, a number, a boolean or a list of
strings, each bounded in length, in key order until the whole document would pass
``MAX_RECORDED_BYTES``. Never recorded: per-token noise and what could be a secret or a
token id (``jti``, the times, nonces and hashes of other tokens), nested objects, and
long values (a token pasted into a claim). Selecting by claim compares a recorded claim's
string value, or membership in a recorded list of strings."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

# Per-token values (they differ on every token of one instance) and values that name or
# prove a token or session: none of them selects an instance, some of them are secrets.
NOT_RECORDED = frozenset(
    {
        "jti",
        "exp",
        "iat",
        "nbf",
        "auth_time",
        "nonce",
        "at_hash",
        "c_hash",
        "s_hash",
        "sid",
        "cnf",
        "uti",
        "rh",
        "xms_st",
    }
)
MAX_RECORDED_BYTES = 4096
MAX_KEY = 128
MAX_VALUE = 256
MAX_LIST = 32


def _value(value: Any) -> Any:
    """The value as recorded, or None when it is not recorded."""
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # NaN is no JSON a store accepts
    if isinstance(value, str):
        return value if len(value) <= MAX_VALUE else None
    if isinstance(value, list) and len(value) <= MAX_LIST:
        if all(isinstance(v, str) and len(v) <= MAX_VALUE for v in value):
            return list(value)
    return None


def recorded_claims(claims: Mapping[str, Any]) -> dict[str, Any]:
    """The claims to record on the instance (see the module's docstring)."""
    kept: dict[str, Any] = {}
    size = 2  # "{}"
    for key in sorted(claims):
        if not isinstance(key, str) or key in NOT_RECORDED or not 0 < len(key) <= MAX_KEY:
            continue
        value = _value(claims[key])
        if value is None:
            continue
        item = len(json.dumps({key: value}, separators=(",", ":"))) - 2 + 1  # "k":v plus ","
        if size + item > MAX_RECORDED_BYTES:
            continue  # a smaller claim later in key order may still fit
        kept[key] = value
        size += item
    return kept
