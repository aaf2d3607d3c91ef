"""Kubernetes resource quantities (``100m``, ``64Mi``, ``0.5``), read exactly enough to
refuse what the API server would refuse and to compare a request with its limit. Pure."""

from __future__ import annotations

import re
from decimal import Decimal

_QUANTITY = re.compile(
    r"^(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<suffix>[KMGTPE]i|[numkMGTPE])?\Z"
)
_FACTOR = {
    None: Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}
EXPECTED = "a Kubernetes quantity like 100m, 0.5, 64Mi or 1G"


def parse_quantity(text: object) -> Decimal:
    """The value of ``text`` in base units; ``ValueError`` saying what was expected."""
    if not isinstance(text, str) or len(text) > 32:
        raise ValueError(f"expected {EXPECTED}")
    match = _QUANTITY.match(text)
    if match is None:
        raise ValueError(f"expected {EXPECTED}, got {text!r}")
    return Decimal(match.group("number")) * _FACTOR[match.group("suffix")]
