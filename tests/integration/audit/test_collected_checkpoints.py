"""Two replicas on one store (PostgreSQL, SQLite), each writing only its own checkpoints to its own
file (real OpenBao transit signing). Someone with the database cuts the tail that only
replica b's checkpoint names, with the checkpoints in the table: verification on replica
a, with its own file, or with a's file collected, finds nothing; the set collected from
both files (brokerctl audit verify --checkpoints a --checkpoints b) finds the cut. A
collected line edited to fit the cut table is reported, never trusted; a line that is not
a checkpoint is refused, named by its number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from broker.audit.checkpoint import parse_line
from broker.leases.migrations import sync_url
from tests.harness.wait import eventually
from tests.integration.audit.test_audit_reading import ctl


def settings(file: Path) -> dict:
    return {"audit": {"checkpoint": {"every": "1h", "every_events": 3, "file": str(file)}}}


async def append(b, n: int) -> None:
    for i in range(n):
        await b.broker.components.ledgers.reconcile.record_audit("reconciler", "test.event", n=i)


def newest(file: Path, past: int = 0) -> int | None:
    """The newest checkpoint's seq in a replica's file, once one is past ``past``."""
    if not file.exists():
        return None
    seqs = [cp.seq for line in file.read_text().splitlines() if (cp := parse_line(line))]
    return max(seqs) if seqs and max(seqs) > past else None


async def verify(http, b, body: dict) -> tuple[int, dict]:
    async with http.post(f"{b.url}/v1/admin/audit/verify", json=body,
                         headers=b.admin()) as resp:
        return resp.status, await resp.json()


def cut_tail(store_url: str, keep: int) -> str:
    """Delete the events after ``keep`` and the checkpoints naming them, move the head
    back: the chain left is sound. The hash of event ``keep``."""
    engine = create_engine(sync_url(store_url))
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_checkpoints WHERE seq > :s"), {"s": keep})
        conn.execute(text("DELETE FROM audit_events WHERE seq > :s"), {"s": keep})
        h = conn.execute(text("SELECT hash FROM audit_events WHERE seq = :s"),
                         {"s": keep}).scalar_one()
        conn.execute(text("UPDATE audit_head SET seq = :s, hash = :h"), {"s": keep, "h": h})
    engine.dispose()
    return h


@pytest.mark.parametrize("store", ["postgresql", "sqlite"])
async def test_the_checkpoints_of_both_replicas_find_a_cut_one_file_misses(
        make_broker, http, tmp_path, store):
    a_file, b_file = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a = await make_broker(store=store, overrides=settings(a_file))
    await append(a, 3)
    a_last = await eventually(lambda: newest(a_file), "replica a's checkpoint")
    await a.broker.stop()  # replica a is down while b checkpoints the next events
    b = await make_broker(store_url=a.store_url, overrides=settings(b_file))
    await append(b, 3)
    b_last = await eventually(lambda: newest(b_file, a_last), "replica b's checkpoint")
    await b.broker.stop()
    assert newest(a_file) == a_last  # a's file holds nothing of b's

    keep = a_last + 1
    kept_hash = cut_tail(a.store_url, keep)
    a2 = await make_broker(store_url=a.store_url, overrides=settings(a_file))  # a, back

    # replica a alone: its own file, and its file collected, end before the cut
    status, report = await verify(http, a2, {})
    assert status == 200 and report["ok"] and report["signatures_checked"], report
    code, out, err = await ctl(a2, "audit", "verify", "--checkpoints", str(a_file),
                               "-o", "json")
    assert code == 0 and json.loads(out)["ok"], (out, err)

    # both replicas' files: b's checkpoint is past the table's end (a's file twice: once)
    code, out, err = await ctl(a2, "audit", "verify", "--checkpoints", str(a_file),
                               "--checkpoints", str(b_file), "--checkpoints", str(a_file),
                               "-o", "json")
    report = json.loads(out)
    assert code == 8 and not report["ok"] and report["tampered"], (out, err)
    assert [(f["kind"], f["seq"]) for f in report["findings"]] == [("truncated", keep + 1)]
    assert f"seq {b_last} (collected)" in report["findings"][0]["message"]
    code, out, _ = await ctl(a2, "audit", "verify", "--checkpoints", str(a_file),
                             "--checkpoints", str(b_file))
    assert code == 8 and "chain BROKEN" in out and "truncated" in out

    # b's line edited to name the last event left, with its hash: its signature says no
    line = b_file.read_text().splitlines()[-1]
    doc = json.loads(line)
    edited = json.dumps({**doc, "seq": keep, "hash": kept_hash})
    status, report = await verify(http, a2, {"checkpoints": [edited]})
    assert status == 200 and not report["ok"] and report["tampered"], report
    assert [(f["kind"], f["seq"]) for f in report["findings"]] == [("bad_signature", keep)]

    # the log record of a checkpoint is a line as good as the file's; anything else is 400
    record = json.dumps({"ts": "x", "level": "info", "msg": "audit.checkpoint",
                         "checkpoint": doc})
    status, report = await verify(http, a2, {"checkpoints": [record]})
    assert status == 200 and [f["kind"] for f in report["findings"]] == ["truncated"]
    status, body = await verify(http, a2, {"checkpoints": [line, "", "{torn"]})
    assert status == 400 and body["error"]["code"] == "invalid_checkpoints"
    assert "line 3 " in body["error"]["message"]

    # past the server's 64 KiB body limit, within this route's 4 MiB; past that, 413
    status, report = await verify(http, a2, {"checkpoints": [line] * 1000})
    assert status == 200 and report["findings"][0]["kind"] == "truncated"
    status, body = await verify(http, a2, {"checkpoints": ["x" * 1024] * 4200})
    assert status == 413 and body["error"]["code"] == "payload_too_large"
