"""The audit chain's arithmetic, free of I/O: each event's canonical document and the hash
that links it to the one before.

``hash = SHA-256(TAG ‖ prev_hash ‖ RFC 8785 canonical JSON of the event)``, with
``prev_hash`` as its 32 raw bytes and the first event's ``prev_hash`` all zeros. The
domain tag keeps an event hash from being mistaken for any other SHA-256 the broker makes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import rfc8785

from broker.clock import iso_z

TAG = b"ephemeral-broker/audit-event/v1\x00"
GENESIS = "0" * 64


def event_document(
    *,
    seq: int,
    at: datetime,
    actor: str,
    action: str,
    instance_id: str | None,
    lease_id: str | None,
    outcome: str,
    reason: str | None,
    detail: Mapping[str, Any],
) -> dict[str, Any]:
    """The event as it is hashed and exported: every stored field but the hashes."""
    return {
        "seq": seq,
        "at": iso_z(at),
        "actor": actor,
        "action": action,
        "instance_id": instance_id,
        "lease_id": lease_id,
        "outcome": outcome,
        "reason": reason,
        "detail": dict(detail),
    }


def link_hash(prev_hash: str, document: Mapping[str, Any]) -> str:
    return hashlib.sha256(TAG + bytes.fromhex(prev_hash) + rfc8785.dumps(document)).hexdigest()


def token_ref(key: bytes, issuer: str, token_id: str) -> str:
    """How an audit event names a token id: a keyed hash (HMAC-SHA256 over the issuer and
    the id), never the id. The same token gives the same reference under the same key."""
    mac = hmac.new(key, issuer.encode() + b"\x00" + token_id.encode(), hashlib.sha256)
    return "hmac-sha256:" + mac.hexdigest()


def unsequenced(document: Mapping[str, Any]) -> bytes:
    """The canonical JSON of an event up to where its ``seq`` goes: ``"seq"`` sorts after
    every other key, so the document's canonical JSON is this, then ``,"seq":N}``. Lets the
    store link events whose seq it assigns itself (``link_hash_at``)."""
    rest = {k: v for k, v in document.items() if k != "seq"}
    return rfc8785.dumps(rest)[:-1]


def link_hash_at(prev_hash: str, unsequenced_json: bytes, seq: int) -> str:
    """``link_hash`` of the document whose ``unsequenced`` JSON is given, at ``seq``: what
    the PostgreSQL store's ``audit_append`` computes."""
    tail = b',"seq":' + str(seq).encode() + b"}"
    return hashlib.sha256(TAG + bytes.fromhex(prev_hash) + unsequenced_json + tail).hexdigest()
