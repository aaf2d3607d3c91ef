"""Review finding 8c: a signature that cannot be checked now (Vault down, a transit key
version newer than the ones read) is reported apart from one that does not verify: the
report is not ok, but not tampered, and ``brokerctl audit verify`` exits 5, not 8. And
finding 3's pure half: events older than the interval that no checkpoint covers."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.checkpoint import SLACK, uncovered_limit
from broker.audit.external import check_external
from broker.audit.signers import FileSigner, Signatures, TransitSigner
from broker.audit.verify import BAD_SIGNATURE, SIGNATURE_UNCHECKED, UNCOVERED, verify
from broker.cli.ctl import EXIT_OK, EXIT_TAMPERED, EXIT_UNAVAILABLE
from broker.cli.ctl_audit import show_verify, verify_verdict
from broker.errors import UpstreamUnavailable
from tests.unit.audit.test_checkpoint import FakeTransitKeys, _signed
from tests.unit.audit.test_verify import checkpoint, kinds, make_chain

KEY = "broker-audit"


class DownTransit(FakeTransitKeys):
    """Transit whose public keys cannot be read (Vault sealed or unreachable)."""

    down = True

    async def public_keys(self, key: str) -> dict[int, bytes]:
        if self.down:
            self.reads += 1
            raise UpstreamUnavailable("vault is sealed", code="vault_unavailable")
        return await super().public_keys(key)


async def test_vault_down_makes_a_transit_signature_uncheckable_not_bad():
    transit = DownTransit()
    now = [0.0]
    sigs = Signatures(transit=transit, transit_key=KEY, monotonic=lambda: now[0])
    cp = await _signed(TransitSigner(transit, KEY))
    assert await sigs.check_async(cp) is None
    assert sigs.check(cp) is None
    transit.down = False
    now[0] += 11
    assert await sigs.check_async(cp) is True
    # once read, a version below the newest that the key does not have is a plain no
    transit.keys[3] = Ed25519PrivateKey.generate()
    now[0] += 11
    assert await sigs.check_async(await _signed(TransitSigner(transit, KEY), seq=9)) is True
    assert sigs.check(replace(cp, key_id=f"transit:{KEY}:v2")) is False


async def test_a_rotation_within_the_refresh_limit_is_uncheckable_then_checked():
    transit = FakeTransitKeys()
    now = [0.0]
    sigs = Signatures(transit=transit, transit_key=KEY, monotonic=lambda: now[0])
    signer = TransitSigner(transit, KEY)
    assert await sigs.check_async(await _signed(signer)) is True
    transit.keys[2] = Ed25519PrivateKey.generate()  # rotated just now
    rotated = await _signed(signer, seq=4)
    assert await sigs.check_async(rotated) is None  # not read again yet: can't tell
    now[0] += 11
    assert await sigs.check_async(rotated) is True
    # a version the key does not have, read just now: forged, not uncheckable
    now[0] += 11
    assert await sigs.check_async(replace(rotated, key_id=f"transit:{KEY}:v7")) is False
    # a forged signature of a known version is bad, whatever Vault's state
    assert await sigs.check_async(replace(rotated, seq=5)) is False


async def test_the_writers_key_tells_its_own_signatures():
    key = FileSigner(Ed25519PrivateKey.generate())
    cp = await _signed(key)
    assert await key.check(cp) is True
    assert await key.check(replace(cp, seq=cp.seq + 1)) is False
    assert await FileSigner(Ed25519PrivateKey.generate()).check(cp) is False
    transit = DownTransit()
    tcp = await _signed(TransitSigner(FakeTransitKeys(), KEY))
    assert await TransitSigner(transit, KEY).check(tcp) is None  # Vault down
    assert await TransitSigner(transit, KEY).check(cp) is False  # not a transit one


@pytest.mark.parametrize(
    ("verdicts", "ok", "tampered", "exit_code"),
    [
        ((True, True), True, False, EXIT_OK),
        ((True, None), False, False, EXIT_UNAVAILABLE),
        ((None, False), False, True, EXIT_TAMPERED),
        ((False, True), False, True, EXIT_TAMPERED),
    ],
    ids=["all-verify", "vault-unreachable", "unreachable-and-forged", "forged"],
)
def test_uncheckable_is_not_ok_but_not_tampered(verdicts, ok, tampered, exit_code):
    events = make_chain(6)
    cps = [checkpoint(events[2]), checkpoint(events[5])]
    by_seq = dict(zip((3, 6), verdicts, strict=True))
    report = verify(events, cps, check_signature=lambda cp: by_seq[cp.seq])
    assert (report.ok, report.tampered) == (ok, tampered)
    expected = {None: SIGNATURE_UNCHECKED, False: BAD_SIGNATURE}
    assert kinds(report) == [(expected[v], s) for s, v in by_seq.items() if v is not True]
    doc = report.to_dict()
    assert doc["tampered"] is tampered
    assert verify_verdict(doc) == exit_code
    shown = show_verify(doc)
    if exit_code == EXIT_UNAVAILABLE:
        assert "NOT FULLY CHECKED" in shown and "Vault unreachable" in shown
        assert "BROKEN" not in shown
    elif exit_code == EXIT_TAMPERED:
        assert "chain BROKEN" in shown


def test_a_report_from_a_broker_without_tampered_counts_as_tampered():
    assert verify_verdict({"ok": False, "findings": []}) == EXIT_TAMPERED


def test_the_external_file_says_unchecked_apart_from_bad():
    events = make_chain(4)
    cps = [checkpoint(events[1], "file"), checkpoint(events[3], "file")]
    found = check_external(
        cps,
        table_end=4,
        hash_at={e.seq: e.hash for e in events},
        check_signature=lambda cp: None if cp.seq == 2 else False,
    )
    assert [(f.problem, f.seq) for f in found] == [("signature_unchecked", 2), ("bad_signature", 4)]


LIMIT = uncovered_limit(timedelta(seconds=60))


@pytest.mark.parametrize(
    ("covered_upto", "age", "expected"),
    [
        (None, LIMIT - timedelta(seconds=1), []),  # young: a checkpoint may still come
        (None, LIMIT + timedelta(seconds=1), [(UNCOVERED, 1)]),  # no checkpoint at all
        (10, LIMIT + timedelta(hours=1), []),  # every event covered
        (4, LIMIT + timedelta(seconds=1), [(UNCOVERED, 5)]),  # old events after seq 4
    ],
    ids=["young", "none-covered-old", "all-covered", "tail-uncovered-old"],
)
def test_old_events_no_checkpoint_covers_are_a_finding(covered_upto, age, expected):
    events = make_chain(10)  # event n at T0 + n s
    cps = [checkpoint(events[covered_upto - 1])] if covered_upto else []
    now = events[-1].at + age - timedelta(seconds=10 - (covered_upto or 0) - 1)
    report = verify(events, cps, now=now, max_uncovered=LIMIT)
    assert kinds(report) == expected
    assert report.tampered is bool(expected)


def test_a_checkpoint_whose_signature_fails_covers_nothing():
    events = make_chain(5)
    now = events[0].at + LIMIT + timedelta(seconds=1)
    report = verify(events, [checkpoint(events[4])], check_signature=lambda cp: False,
                    now=now, max_uncovered=LIMIT)
    assert kinds(report) == [(UNCOVERED, 1), (BAD_SIGNATURE, 5)]


def test_the_limit_is_the_interval_and_a_slack():
    assert uncovered_limit(timedelta(seconds=60)) == timedelta(seconds=60) + SLACK
