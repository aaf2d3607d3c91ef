"""A checkpoint's arithmetic: when one is due, what its signature covers, its line in the
external file; and the signers' signatures checked against the trusted keys only."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.checkpoint import (
    TAG,
    Checkpoint,
    due,
    file_line,
    message,
    parse_line,
    signed_message,
)
from broker.audit.signers import FileSigner, Signatures, TransitSigner

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
MINUTE = timedelta(seconds=60)
H = "ab" * 32


@pytest.mark.parametrize(
    ("head", "last", "last_at", "now", "expected"),
    [
        (0, 0, None, T0, False),  # nothing ever written
        (1, 0, None, T0, True),  # the first event, no checkpoint yet
        (5, 5, T0, T0 + 10 * MINUTE, False),  # time passed, but no new event
        (6, 5, T0, T0 + timedelta(seconds=59), False),  # one event, T not yet elapsed
        (6, 5, T0, T0 + MINUTE, True),  # one event, T elapsed
        (1004, 5, T0, T0 + timedelta(seconds=1), False),  # 999 events: not N yet
        (1005, 5, T0, T0 + timedelta(seconds=1), True),  # N events since the last
        (4, 5, T0, T0 + MINUTE, False),  # head behind the checkpoint: never re-signed
    ],
    ids=["empty", "first-event", "no-new-event", "before-T", "at-T", "below-N", "at-N",
         "head-behind"],
)
def test_due(head, last, last_at, now, expected):
    assert due(head_seq=head, last_seq=last, last_at=last_at, now=now,
               every_events=1000, every=MINUTE) is expected


def test_the_message_is_the_tag_and_the_canonical_json_of_seq_hash_and_time():
    at = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert message(7, H, at) == (
        TAG + b'{"at":"2026-01-01T12:00:00.123456Z","hash":"' + H.encode() + b'","seq":7}'
    )
    assert TAG == b"ephemeral-broker/audit-checkpoint/v1\x00"


def test_a_file_line_reads_back_as_the_same_checkpoint():
    cp = Checkpoint(42, H, T0, "transit", "transit:broker-audit:v1", "c2ln")
    line = file_line(cp)
    assert "\n" not in line
    assert parse_line(line) == cp


@pytest.mark.parametrize("line", ["", "{", '{"seq": 1}', "[]", '{"seq":"x","hash":"h","at":'
                                  '"2026-01-01T00:00:00Z","signer":"f","key_id":"k",'
                                  '"signature":"s"}', '{"seq":1,"hash":"h","at":"2026-01-01",'
                                  '"signer":"f","key_id":"k","signature":"s"}'],
                         ids=["blank", "torn", "missing-fields", "not-object", "bad-seq",
                              "naive-time"])
def test_a_line_that_is_not_a_checkpoint_is_none(line):
    assert parse_line(line) is None


async def _signed(signer, seq=3, at=T0) -> Checkpoint:
    who, key_id, signature = await signer.sign(message(seq, H, at))
    return Checkpoint(seq, H, at, who, key_id, signature)


async def test_a_file_signature_verifies_with_its_key_and_no_other():
    signer = FileSigner(Ed25519PrivateKey.generate())
    other = FileSigner(Ed25519PrivateKey.generate())
    trusting = Signatures()
    trusting.trust_file_key(signer.public)
    cp = await _signed(signer)
    assert cp.signer == "file" and cp.key_id.startswith("file:")
    assert trusting.check(cp)
    assert await trusting.check_async(cp)
    # re-signed by another key (an attacker's): its own key id, or the trusted one
    forged = await _signed(other)
    assert not trusting.check(forged)
    assert not trusting.check(Checkpoint(3, H, T0, "file", signer.key_id, forged.signature))
    # the statement changed under a good signature
    assert not trusting.check(Checkpoint(4, H, T0, "file", cp.key_id, cp.signature))
    assert not trusting.check(Checkpoint(3, "cd" * 32, T0, "file", cp.key_id, cp.signature))
    assert not trusting.check(
        Checkpoint(3, H, T0 + MINUTE, "file", cp.key_id, cp.signature))
    # garbage signatures are a plain no
    assert not trusting.check(Checkpoint(3, H, T0, "file", cp.key_id, "not base64!"))
    assert not Signatures().check(cp)  # no file key trusted at all


class FakeTransitKeys:
    """Stands in for transit only in this unit test (the integration test signs with
    real OpenBao): an Ed25519 key per version, counting public-key reads."""

    def __init__(self) -> None:
        self.keys = {1: Ed25519PrivateKey.generate()}
        self.reads = 0

    async def sign(self, key: str, data: bytes) -> tuple[bytes, int]:
        version = max(self.keys)
        return self.keys[version].sign(data), version

    async def public_keys(self, key: str) -> dict[int, bytes]:
        self.reads += 1
        return {v: FileSigner(k).public for v, k in self.keys.items()}


async def test_transit_signatures_fetch_public_keys_once_and_again_after_rotation():
    transit = FakeTransitKeys()
    now = [0.0]
    sigs = Signatures(transit=transit, transit_key="broker-audit", monotonic=lambda: now[0])
    signer = TransitSigner(transit, "broker-audit")
    cp = await _signed(signer)
    assert (cp.signer, cp.key_id) == ("transit", "transit:broker-audit:v1")
    assert not sigs.check(cp)  # not fetched yet: the sync check knows no key
    await sigs.prefetch([cp])
    assert sigs.check(cp) and transit.reads == 1
    assert await sigs.check_async(cp) and transit.reads == 1  # cached
    transit.keys[2] = Ed25519PrivateKey.generate()  # rotated
    cp2 = await _signed(signer, seq=4)
    assert cp2.key_id == "transit:broker-audit:v2"
    assert not await sigs.check_async(cp2)  # within the cooldown: not fetched again
    now[0] += 11
    assert await sigs.check_async(cp2) and transit.reads == 2
    assert sigs.check(cp)  # the old version still verifies old checkpoints
    # another transit key's name is not trusted, even with a valid signature
    assert not sigs.check(Checkpoint(3, H, T0, "transit", "transit:other:v1", cp.signature))
    assert not sigs.check(Checkpoint(3, H, T0, "file", "transit:broker-audit:v1", cp.signature))


def test_signed_message_covers_the_checkpoint_fields():
    cp = Checkpoint(9, H, T0, "file", "file:x", base64.b64encode(b"x").decode())
    assert signed_message(cp) == message(9, H, T0)
