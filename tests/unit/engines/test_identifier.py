"""Each engine names its credential by a non-secret identifier (``Engine.identifier``):
what an operator ends by hand when Vault forgets a lease. Never a secret, never a
non-string, None when there is nothing to name."""

from __future__ import annotations

from typing import Any

import pytest

from broker.engines import ENGINES
from broker.engines.base import text_ref
from broker.engines.role import RoleSettings


def _role(engine: str, **kw: Any) -> RoleSettings:
    return RoleSettings.model_construct(
        engine=engine, mount=engine, vault_role="r", mode=None, params={}, options={}, **kw
    )


@pytest.mark.parametrize(("engine", "data", "expected"), [
    ("database", {"username": "v-app-x1", "password": "secret"}, {"username": "v-app-x1"}),
    ("rabbitmq", {"username": "v-rmq-1", "password": "secret"}, {"username": "v-rmq-1"}),
    ("pki", {"serial_number": "1a:2b", "certificate": "PEM", "private_key": "KEY"},
     {"serial_number": "1a:2b"}),
    ("ssh", {"serial_number": "c0ffee", "signed_key": "ssh-ed25519-cert..."},
     {"serial_number": "c0ffee"}),
    ("azure", {"client_id": "app-1", "client_secret": "s"}, {"client_id": "app-1"}),
    ("aws", {"access_key": "AKIAEXAMPLE", "secret_key": "s"}, {"access_key_id": "AKIAEXAMPLE"}),
    ("database", {"password": "secret"}, None),
    ("database", {"username": 42}, None),
    ("database", {"username": ""}, None),
    ("pki", {}, None),
    ("kv", {"data": {"password": "x"}}, None),
    ("gcp", {"token": "ya29"}, None),
], ids=lambda v: v if isinstance(v, str) else None)
def test_identifier_names_only_the_non_secret_part(
    engine: str, data: dict[str, Any], expected: dict[str, str] | None
) -> None:
    out = ENGINES[engine].identifier(_role(engine), data)
    assert out == expected
    secrets = {"secret", "s", "KEY", "PEM", "ya29"}
    assert not secrets & set((out or {}).values())


def test_text_ref_caps_the_length_and_skips_non_strings() -> None:
    assert text_ref({"u": "x" * 257}, username="u") is None
    assert text_ref({"u": "x" * 256}, username="u") == {"username": "x" * 256}
    assert text_ref({"u": None, "v": "b"}, a="u", b="v") == {"b": "b"}
