"""The audit section: the token-id hash key is a secret of a useful length, or absent;
the keyed token reference; the store-side link hash."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from broker.audit.settings import AuditSettings
from broker.leases.chain import (
    GENESIS,
    event_document,
    link_hash,
    link_hash_at,
    token_ref,
    unsequenced,
)


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


@settings(max_examples=100, deadline=None)
@given(
    seq=st.integers(1, 2**53 - 1),
    actor=st.text(max_size=20),
    reason=st.none() | st.text(max_size=20),
    detail=st.dictionaries(
        st.text(max_size=8),
        st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=8),
        max_size=5,
    ),
)
def test_the_store_side_link_hash_equals_the_chain_hash(seq, actor, reason, detail):
    """The PostgreSQL append hashes ``unsequenced`` JSON with the seq it assigns: the same
    bytes, so the same hash, as the document with its seq."""
    doc = event_document(seq=seq, at=datetime(2026, 1, 1, tzinfo=UTC), actor=actor,
                         action="a.b", instance_id=None, lease_id="l-1", outcome="ok",
                         reason=reason, detail=detail)
    assert link_hash_at(GENESIS, unsequenced(doc), seq) == link_hash(GENESIS, doc)
