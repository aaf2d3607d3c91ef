"""Golden files for the contract tests: what the broker shows the outside world, pinned so
a refactor can prove it changed nothing.

A normal run compares; ``BROKER_UPDATE_GOLDEN=1`` rewrites the files instead (then read
the diff before committing it). JSON goldens are pretty-printed with sorted keys so a
change reads as a small diff.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE_ENV = "BROKER_UPDATE_GOLDEN"


def updating() -> bool:
    return os.environ.get(UPDATE_ENV) == "1"


def render(value: Any) -> str:
    if isinstance(value, str):
        return value if value.endswith("\n") else value + "\n"
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def assert_golden(name: str, value: Any) -> None:
    """``value`` (JSON data or text) equals the golden file ``name``."""
    path = GOLDEN_DIR / name
    text = render(value)
    if updating():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"no golden file {path}; create it with {UPDATE_ENV}=1"
    expected = path.read_text()
    if name.endswith(".json"):
        # Compared as data so pytest shows a structural diff; the text form is sorted anyway.
        assert json.loads(text) == json.loads(expected), f"{name} differs from the golden"
    else:
        assert text == expected, f"{name} differs from the golden"


# -- masking volatile values ---------------------------------------------------------------

_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})")
_IDS = {"lease": re.compile(r"\bl-[0-9a-f]{32}\b"), "job": re.compile(r"\bj-[0-9a-f]{32}\b")}
# Values that differ on every run whatever their key's position: secrets Vault generates,
# certificates, Vault's own identifiers.
SECRET_KEYS = frozenset({
    "username", "password", "certificate", "private_key", "issuing_ca", "ca_chain",
    "serial_number", "expiration", "accessor", "token_accessor", "vault_lease_id",
})


class Masker:
    """Replaces volatile values with stable placeholders. The n-th distinct lease id seen
    becomes ``<lease-n>`` (so a page's ``next`` still visibly names one of its leases),
    timestamps become ``<time>``, and values under ``SECRET_KEYS`` become ``<masked>``."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def _placeholder(self, kind: str, value: str) -> str:
        if value not in self._seen:
            n = sum(1 for v in self._seen.values() if v.startswith(f"<{kind}-")) + 1
            self._seen[value] = f"<{kind}-{n}>"
        return self._seen[value]

    def text(self, value: str) -> str:
        for kind, pattern in _IDS.items():
            value = pattern.sub(lambda m, k=kind: self._placeholder(k, m.group(0)), value)
        return _TIME.sub("<time>", value)

    def __call__(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: "<masked>" if k in SECRET_KEYS and v is not None else self(v)
                    for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, str):
            return self.text(value)
        return value
