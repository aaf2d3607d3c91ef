"""A checkpoint of the audit chain, free of I/O: what is signed, when one is due, and how
it is written outside the database.

The signed message is ``TAG ‖ RFC 8785 canonical JSON of {"seq", "hash", "at"}``: the
domain tag keeps a checkpoint signature from being valid as any other signature the key
makes (a transit key may sign other things).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import rfc8785

from broker.clock import iso_z
from broker.leases import CheckpointView

TAG = b"ephemeral-broker/audit-checkpoint/v1\x00"

# The ledgers' view of a checkpoint row is the checkpoint itself.
Checkpoint = CheckpointView


def document(cp: Checkpoint) -> dict[str, Any]:
    """A checkpoint as it is logged, written to the external file and served."""
    return {
        "seq": cp.seq,
        "hash": cp.hash,
        "at": iso_z(cp.at),
        "signer": cp.signer,
        "key_id": cp.key_id,
        "signature": cp.signature,
    }


def signed_message(cp: Checkpoint) -> bytes:
    return message(cp.seq, cp.hash, cp.at)


def message(seq: int, head_hash: str, at: datetime) -> bytes:
    """The bytes a checkpoint's signature covers."""
    return TAG + rfc8785.dumps({"seq": seq, "hash": head_hash, "at": iso_z(at)})


def due(
    *,
    head_seq: int,
    last_seq: int,
    last_at: datetime | None,
    now: datetime,
    every_events: int,
    every: timedelta,
) -> bool:
    """Whether to checkpoint now: ``every_events`` events since the last checkpoint, or
    ``every`` elapsed with any event since. ``last_at`` None: there is no checkpoint yet
    (any new event is then enough)."""
    new = head_seq - last_seq
    if new <= 0:
        return False
    if new >= every_events:
        return True
    return last_at is None or now - last_at >= every


# How late a checkpoint may come beyond ``every`` before the events it would cover count
# as uncovered: the writer's tick, a slow signer, clocks of replicas a little apart.
SLACK = timedelta(seconds=120)


def uncovered_limit(every: timedelta) -> timedelta:
    """The age past which an event no checkpoint covers is a finding of verification:
    with the writer working, each event is covered at most ``every`` (plus a tick) after
    the checkpoint before it was signed."""
    return every + SLACK


def file_line(cp: Checkpoint) -> str:
    """One line of the external checkpoint file (JSON, no newline inside)."""
    return json.dumps(document(cp), separators=(",", ":"), sort_keys=True)


def parse_line(line: str) -> Checkpoint | None:
    """A checkpoint from a line of the external file; None for a line that is not one (a
    torn last line after a crash, a blank line)."""
    try:
        doc = json.loads(line)
        return Checkpoint(
            seq=int(doc["seq"]),
            hash=str(doc["hash"]),
            at=_utc(str(doc["at"])),
            signer=str(doc["signer"]),
            key_id=str(doc["key_id"]),
            signature=str(doc["signature"]),
        )
    except (ValueError, KeyError, TypeError, OverflowError):  # OverflowError: "seq": 1e400
        return None


def _utc(text: str) -> datetime:
    at = datetime.fromisoformat(text)
    if at.tzinfo is None:
        raise ValueError("a checkpoint's time must name its zone")
    return at.astimezone(UTC)
