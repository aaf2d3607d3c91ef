"""Vault path segments: a trailing newline is refused (the pattern once ended in '$', which
also matches before a final '\\n')."""

from __future__ import annotations

import pytest

from broker.errors import UpstreamRejected
from broker.vault.paths import vault_path


def test_vault_path_joins_valid_segments() -> None:
    assert vault_path("pki", "issue", "dev-cert") == "pki/issue/dev-cert"


@pytest.mark.parametrize("segment", ["pki\n", "dev-cert\n", "a/b", "..", "a..b", "", "\npki"],
                         ids=["trailing-newline", "role-trailing-newline", "slash", "dotdot",
                              "inner-dotdot", "empty", "leading-newline"])
def test_vault_path_refuses_bad_segment(segment: str) -> None:
    with pytest.raises(UpstreamRejected) as info:
        vault_path("pki", segment)
    assert info.value.code == "vault_path_refused"
