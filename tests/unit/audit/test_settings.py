"""The audit section: the token-id hash key is a secret of a useful length, or absent."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from broker.audit.settings import AuditSettings
from broker.leases.chain import token_ref


def test_no_key_by_default():
    assert AuditSettings().hash_key is None


def test_a_short_key_is_refused():
    with pytest.raises(ValidationError, match="at least 32 characters"):
        AuditSettings(hash_key="short")


def test_the_key_is_not_printed():
    settings = AuditSettings(hash_key="s" * 40)
    assert "s" * 40 not in repr(settings) and "s" * 40 not in str(settings)


def test_a_token_reference_is_keyed_and_never_the_id():
    a = token_ref(b"k" * 32, "dev", "jti-1")
    assert a.startswith("hmac-sha256:") and "jti-1" not in a
    assert a == token_ref(b"k" * 32, "dev", "jti-1")
    assert a != token_ref(b"j" * 32, "dev", "jti-1")  # another key
    assert a != token_ref(b"k" * 32, "ci", "jti-1")  # another issuer's token
