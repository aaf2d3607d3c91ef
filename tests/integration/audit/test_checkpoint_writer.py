"""The checkpoint writer on the real store (SQLite and PostgreSQL): a checkpoint after N
events, after T with new events, none without; a signer failure is retried; two
replicas never both write; the external file holds the same checkpoints."""

from __future__ import annotations

import asyncio
import json
import logging

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.checkpoint import document, parse_line
from broker.audit.settings import CheckpointSettings
from broker.audit.signers import FileSigner, Signatures
from broker.audit.writer import CheckpointWriter
from broker.errors import UpstreamUnavailable
from tests.integration.leases.conftest import ledgers  # noqa: F401 — the two-backend fixture


async def append(s, n: int) -> None:
    for i in range(n):
        await s.reconcile.record_audit("reconciler", "test.event", n=i)


async def test_a_checkpoint_after_n_events_and_after_t_with_new_events(ledgers, tmp_path):  # noqa: F811
    s = await ledgers()
    clock = ledgers.clock
    key = FileSigner(Ed25519PrivateKey.generate())
    settings = CheckpointSettings(every_events=5, every=60, signer="file",
                                  file=tmp_path / "checkpoints.jsonl")
    writer = CheckpointWriter(settings, s.audit, key, clock)

    assert await writer.run_once() is None  # no event at all
    await append(s, 1)
    first = await writer.run_once()  # the first event, no checkpoint yet: at once
    assert first is not None and first.seq == 1
    await append(s, 4)
    assert await writer.run_once() is None  # 4 events, T not elapsed
    await append(s, 1)
    by_count = await writer.run_once()  # 5 events since
    assert by_count is not None and by_count.seq == 6
    await append(s, 1)
    clock.advance(59)
    assert await writer.run_once() is None
    clock.advance(1)
    by_time = await writer.run_once()
    assert by_time is not None and by_time.seq == 7 and by_time.at == clock.now()
    clock.advance(3600)
    assert await writer.run_once() is None  # time passed, nothing new

    stored = await s.audit.checkpoints()
    assert stored == [first, by_count, by_time]
    head_seq, head_hash = await s.audit.head()
    assert (head_seq, head_hash) == (7, by_time.hash)
    trusted = Signatures()
    trusted.trust_file_key(key.public)
    assert all(trusted.check(cp) for cp in stored)
    lines = settings.file.read_text().splitlines()
    assert [parse_line(x) for x in lines] == stored  # source: where it is read from
    assert writer.last_seq == 7 and writer.age_s() == 3600


class FailingSigner:
    def __init__(self, inner) -> None:
        self.inner = inner
        self.fail = True

    async def sign(self, message: bytes):
        if self.fail:
            raise UpstreamUnavailable("Vault is unavailable or sealed; retry shortly")
        return await self.inner.sign(message)


async def test_a_signer_failure_is_logged_and_retried_at_the_next_tick(ledgers, caplog):  # noqa: F811
    s = await ledgers()
    signer = FailingSigner(FileSigner(Ed25519PrivateKey.generate()))
    writer = CheckpointWriter(CheckpointSettings(every_events=1, signer="file"), s.audit,
                              signer, ledgers.clock)
    await append(s, 2)
    with caplog.at_level(logging.ERROR, logger="broker.audit.writer"):
        assert await writer.run_once() is None
    assert writer.failures == 1 and "could not sign" in caplog.text
    assert await s.audit.checkpoints() == []
    signer.fail = False
    cp = await writer.run_once()
    assert cp is not None and cp.seq == 2 and writer.failures == 0


async def test_the_log_line_carries_the_checkpoint(ledgers, caplog):  # noqa: F811
    s = await ledgers()
    writer = CheckpointWriter(CheckpointSettings(signer="file"), s.audit,
                              FileSigner(Ed25519PrivateKey.generate()), ledgers.clock)
    await append(s, 1)
    with caplog.at_level(logging.INFO, logger="broker.audit.writer"):
        cp = await writer.run_once()
    [record] = [r for r in caplog.records if r.getMessage() == "audit.checkpoint"]
    assert record.checkpoint == document(cp)
    assert json.dumps(record.checkpoint)  # one JSON log line


async def test_two_replicas_write_each_checkpoint_once(ledgers):  # noqa: F811
    replicas = [await ledgers(), await ledgers()]
    key = FileSigner(Ed25519PrivateKey.generate())
    writers = [CheckpointWriter(CheckpointSettings(every_events=1, signer="file"), r.audit,
                                key, ledgers.clock) for r in replicas]
    for round_ in range(5):
        await append(replicas[round_ % 2], 1)
        results = await asyncio.gather(*(w.run_once() for w in writers),
                                       return_exceptions=True)
        assert not [r for r in results if isinstance(r, BaseException)], results
    stored = await replicas[0].audit.checkpoints()
    assert [cp.seq for cp in stored] == sorted({cp.seq for cp in stored})
    assert stored[-1].seq == 5
