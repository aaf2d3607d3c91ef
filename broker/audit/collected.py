"""Checkpoints an operator collected outside the broker, for a verification to hold against
the stored chain: every replica's checkpoint file and the ``audit.checkpoint`` log lines
shipped to an append-only store. Free of I/O.

Each replica writes only its own checkpoints to its own file, so no one file proves the
tail was not cut after that replica's last checkpoint; the set collected from all of them
does. A line is a checkpoint as the file writes it (``checkpoint.file_line``) or a log
record of one (``{"msg": "audit.checkpoint", "checkpoint": {...}}``); a blank line is
skipped, anything else is refused with its line number (the operator fixes the input,
nothing is guessed). The same checkpoint found in several files, or in a file and the
log, is kept once. Each line's signature is checked by the verification like any other
checkpoint's: a line edited after it was signed is ``bad_signature``, never trusted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from broker.audit.checkpoint import Checkpoint, parse_line

# At most this many lines in one verification (a checkpoint a minute is a week's worth;
# verify an older stretch with ``from``), each at most this long (a log record of a
# checkpoint is ~450 characters), in a request body of at most ``MAX_BODY`` bytes.
MAX_CHECKPOINTS = 5000
MAX_LINE = 1024
MAX_BODY = 4 * 1024 * 1024
# Where a collected checkpoint came from, in a finding's message.
SOURCE = "collected"
LOG_MESSAGE = "audit.checkpoint"


@dataclass(frozen=True)
class NotACheckpoint(Exception):
    """Line ``where`` (a 1-based number, or ``FILE:LINE``) is not a checkpoint."""

    where: str
    why: str

    def __str__(self) -> str:
        return f"line {self.where} is not an audit checkpoint: {self.why}"


def parse_collected(line: str) -> Checkpoint | None:
    """A checkpoint from a line of a checkpoint file or an ``audit.checkpoint`` log record;
    None for anything else."""
    if len(line) > MAX_LINE:
        return None
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if isinstance(doc, dict) and doc.get("msg") == LOG_MESSAGE:
        doc = doc.get("checkpoint")
    if not isinstance(doc, dict):
        return None
    return parse_line(json.dumps(doc))


def _why(line: str) -> str:
    if len(line) > MAX_LINE:
        return f"longer than {MAX_LINE} characters"
    return (
        "expected a line of a checkpoint file ({seq, hash, at, signer, key_id, signature}) "
        f"or an {LOG_MESSAGE} log record"
    )


def collect(lines: Sequence[str], *, from_seq: int = 1) -> list[Checkpoint]:
    """The distinct checkpoints of ``lines`` at or after ``from_seq`` (``source``
    ``collected``), in the order first seen. Raises ``NotACheckpoint`` naming the first
    line (1-based) that is neither blank nor a checkpoint."""
    found: dict[Checkpoint, None] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        cp = parse_collected(line)
        if cp is None:
            raise NotACheckpoint(str(number), _why(line))
        if cp.seq >= from_seq:
            found.setdefault(replace(cp, source=SOURCE))
    return list(found)


def gather(sources: Iterable[tuple[str, str]], *, from_seq: int = 1) -> list[str]:
    """The lines to send for the texts of ``sources`` (name, text): one per distinct
    checkpoint at or after ``from_seq`` (the first line that carries it), in the order
    read. Raises ``NotACheckpoint`` naming ``FILE:LINE``."""
    seen: set[Checkpoint] = set()
    lines: list[str] = []
    for name, text in sources:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            cp = parse_collected(line)
            if cp is None:
                raise NotACheckpoint(f"{name}:{number}", _why(line))
            if cp.seq >= from_seq and cp not in seen:
                seen.add(cp)
                lines.append(line.strip())
    return lines
