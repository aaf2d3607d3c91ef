"""Signed checkpoints in a running broker on real OpenBao and PostgreSQL: the transit key
signs (the signature checks out against the public key OpenBao publishes), a file key
signs in development, a checkpoint re-signed by another key fails, and deleting the
table's tail is caught through the external checkpoint file."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from sqlalchemy import create_engine, text

from broker.audit.checkpoint import Checkpoint, signed_message
from broker.audit.external import external_findings
from broker.audit.signers import FileSigner
from broker.leases.migrations import sync_url
from tests.harness.wait import eventually


async def append(b, n: int) -> None:
    for i in range(n):
        await b.broker.components.ledgers.reconcile.record_audit("reconciler", "test.event", n=i)


async def checkpoints(b) -> list[Checkpoint]:
    return await b.broker.components.ledgers.audit.checkpoints()


async def test_transit_signs_checkpoints_after_t_and_openbao_s_public_key_verifies_them(
        make_broker, vault, tmp_path):
    file = tmp_path / "checkpoints.jsonl"
    b = await make_broker(overrides={"audit": {"checkpoint": {
        "every": "1s", "every_events": 100000, "signer": "transit", "file": str(file)}}})
    await append(b, 2)
    [first] = await eventually(lambda: checkpoints(b), "a first checkpoint")
    assert first.signer == "transit" and first.key_id.startswith("transit:broker-audit:v")
    await append(b, 1)
    later = await eventually(
        lambda: _newer(b, first.seq), "a checkpoint after T with a new event")
    assert (later.at - first.at).total_seconds() >= 1
    # checked independently of the broker's code: OpenBao's public key, the raw message
    status, body = vault.call("GET", "transit/keys/broker-audit")
    assert status == 200 and body["data"]["type"] == "ed25519"
    version = first.key_id.rsplit(":v", 1)[1]
    public = base64.b64decode(body["data"]["keys"][version]["public_key"])
    Ed25519PublicKey.from_public_bytes(public).verify(
        base64.b64decode(first.signature), signed_message(first))
    signatures = b.broker.components.signing.signatures
    assert await signatures.check_async(first) and await signatures.check_async(later)
    # a checkpoint re-signed with another key (someone with the database, not the key)
    forged_sig = base64.b64encode(Ed25519PrivateKey.generate().sign(signed_message(first)))
    forged = Checkpoint(first.seq, first.hash, first.at, first.signer, first.key_id,
                        forged_sig.decode())
    assert not await signatures.check_async(forged)
    # the external file holds the same checkpoints; nothing to report while intact
    chain = b.broker.components.ledgers.audit
    assert await external_findings(file, chain, signatures) == []
    # delete the tail (events and the checkpoints naming them), as an intruder would
    end = later.seq
    engine = create_engine(sync_url(b.store_url))
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_checkpoints WHERE seq >= :s"), {"s": first.seq + 1})
        conn.execute(text("DELETE FROM audit_events WHERE seq > :s"), {"s": first.seq})
        conn.execute(text("UPDATE audit_head SET seq = :s, hash = :h"),
                     {"s": first.seq, "h": first.hash})
    engine.dispose()
    findings = await external_findings(file, chain, signatures)
    assert [(f.problem, f.seq) for f in findings][:1] == [("truncated", end)]


async def _newer(b, seq: int):
    found = [cp for cp in await checkpoints(b) if cp.seq > seq]
    return found[-1] if found else None


async def test_a_file_key_signs_in_development_and_names_its_key(make_broker, tmp_path):
    key = Ed25519PrivateKey.generate()
    pem = tmp_path / "audit-key.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    b = await make_broker(store="sqlite", overrides={"audit": {
        "checkpoint": {"every_events": 3, "every": "1h", "signer": "file"},
        "file": {"private_key": str(pem)}}})
    await append(b, 3)
    [cp] = await eventually(lambda: checkpoints(b), "a checkpoint after 3 events")
    assert (cp.seq, cp.signer, cp.key_id) == (3, "file", FileSigner(key).key_id)
    key.public_key().verify(base64.b64decode(cp.signature), signed_message(cp))
    assert b.broker.components.signing.signatures.check(cp)


async def test_a_tampered_external_line_is_reported(make_broker, tmp_path):
    file = tmp_path / "checkpoints.jsonl"
    b = await make_broker(store="sqlite", overrides={"audit": {"checkpoint": {
        "every": "1s", "signer": "transit", "file": str(file)}}})
    await append(b, 1)
    [cp] = await eventually(lambda: checkpoints(b), "a checkpoint")
    await eventually(lambda: file.exists() and file.read_text(), "the checkpoint file")
    line = file.read_text().splitlines()[0]
    file.write_text(line.replace(f'"seq":{cp.seq}', f'"seq":{cp.seq + 50}') + "\n{torn")
    signatures = b.broker.components.signing.signatures
    findings = await external_findings(file, b.broker.components.ledgers.audit, signatures)
    assert sorted(f.problem for f in findings) == ["bad_signature", "unreadable"]


async def test_verify_checks_signatures_and_finds_a_cut_tail_through_the_file(
        make_broker, http, tmp_path):
    file = tmp_path / "checkpoints.jsonl"
    b = await make_broker(overrides={"audit": {"checkpoint": {
        "every": "1s", "every_events": 3, "signer": "transit", "file": str(file)}}})
    await append(b, 3)
    await eventually(lambda: _newer(b, 2), "a checkpoint of seq 3")

    async def verify():
        async with http.post(f"{b.url}/v1/admin/audit/verify", headers=b.admin()) as resp:
            assert resp.status == 200
            return await resp.json()

    report = await verify()
    assert report["ok"] and report["signatures_checked"], report
    # the tail and its checkpoints deleted, the head row put back: only the file knows
    engine = create_engine(sync_url(b.store_url))
    with engine.begin() as conn:
        h = conn.execute(text("SELECT hash FROM audit_events WHERE seq = 1")).scalar_one()
        conn.execute(text("DELETE FROM audit_checkpoints"))
        conn.execute(text("DELETE FROM audit_events WHERE seq > 1"))
        conn.execute(text("UPDATE audit_head SET seq = 1, hash = :h"), {"h": h})
    engine.dispose()
    report = await verify()
    assert not report["ok"]
    assert "truncated" in {f["kind"] for f in report["findings"]}, report


async def test_a_signer_that_fails_is_retried_and_shown_not_fatal(make_broker, http):
    b = await make_broker(store="sqlite", overrides={"audit": {
        "checkpoint": {"every": "1s"}, "transit": {"key": "no-such-key"}}})
    await append(b, 1)

    async def failures() -> float:
        async with http.get(f"{b.url}/metrics") as resp:
            for line in (await resp.text()).splitlines():
                if line.startswith("broker_audit_checkpoint_failures "):
                    return float(line.split()[1])
        return 0.0

    assert await eventually(lambda: _at_least(failures, 2), "signing retried and failing")
    assert await checkpoints(b) == []
    async with http.get(f"{b.url}/healthz") as resp:
        assert resp.status == 200  # the broker goes on serving


async def _at_least(probe, n: float) -> bool:
    return await probe() >= n
