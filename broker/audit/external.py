"""The checkpoints written outside the database, held against the table: what a
verification adds to the chain's own checks.

Someone with write access to the database can delete the newest events and the
checkpoints that name them, and the chain that is left is internally sound. The external
file (and the log stream) still holds those checkpoints: a checkpoint there whose ``seq``
is past the table's end proves the tail was cut; one whose hash differs from the stored
event's proves history was rewritten. Pure: the caller reads the file and the events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from broker.audit.checkpoint import Checkpoint, parse_line
from broker.audit.signers import Signatures


@dataclass(frozen=True)
class ExternalFinding:
    """``truncated``: the table ends before ``seq``; ``mismatch``: the event at ``seq``
    has another hash; ``bad_signature``: the file's checkpoint does not verify (the file
    was edited, or signed by a key not trusted); ``signature_unchecked``: its signature
    cannot be checked now (Vault unreachable, a key version not read yet): no evidence of
    tampering; ``unreadable``: a line is not a checkpoint (a torn last line after a crash
    is only that)."""

    problem: str
    seq: int | None
    detail: str

    def public(self) -> dict[str, object]:
        return {"problem": self.problem, "seq": self.seq, "detail": self.detail}


def read_checkpoint_file(path: Path) -> tuple[list[Checkpoint], list[int]]:
    """The file's checkpoints, and the line numbers (1-based) that are not checkpoints.
    A missing file is empty (no checkpoint was ever written to it)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], []
    found: list[Checkpoint] = []
    bad: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cp = parse_line(line)
        if cp is None:
            bad.append(number)
        else:
            found.append(cp)
    return found, bad


def check_external(
    external: Iterable[Checkpoint],
    *,
    table_end: int,
    hash_at: Mapping[int, str],
    check_signature: Callable[[Checkpoint], bool | None],
    unreadable_lines: Iterable[int] = (),
) -> list[ExternalFinding]:
    """Findings, ``truncated`` first (the newest external checkpoint past ``table_end``,
    the table's last seq), then per checkpoint in seq order. ``hash_at``: the stored
    event hashes at (at least) the external checkpoints' seqs that the table holds."""
    findings: list[ExternalFinding] = []
    checkpoints = sorted(external, key=lambda cp: cp.seq)
    verdicts = {id(cp): check_signature(cp) for cp in checkpoints}
    trusted = [cp for cp in checkpoints if verdicts[id(cp)]]
    past_end = [cp for cp in trusted if cp.seq > table_end]
    if past_end:
        newest = past_end[-1]
        findings.append(
            ExternalFinding(
                "truncated",
                newest.seq,
                f"a signed checkpoint outside the database names event {newest.seq}, "
                f"but the table ends at {table_end}: events were deleted from the tail",
            )
        )
    for cp in checkpoints:
        if verdicts[id(cp)] is None:
            findings.append(
                ExternalFinding(
                    "signature_unchecked",
                    cp.seq,
                    f"the external checkpoint of event {cp.seq} could not be checked now "
                    f"(key {cp.key_id} could not be read: Vault unreachable?)",
                )
            )
        elif cp not in trusted:
            findings.append(
                ExternalFinding(
                    "bad_signature",
                    cp.seq,
                    f"the external checkpoint of event {cp.seq} does not verify (key {cp.key_id})",
                )
            )
        elif cp.seq <= table_end and hash_at.get(cp.seq) != cp.hash:
            findings.append(
                ExternalFinding(
                    "mismatch",
                    cp.seq,
                    f"event {cp.seq} in the table does not have the hash its signed "
                    "checkpoint outside the database names: history was rewritten",
                )
            )
    for line in unreadable_lines:
        findings.append(ExternalFinding("unreadable", None, f"line {line} of the checkpoint file"))
    return findings


class StoredChain(Protocol):
    async def table_end(self) -> int: ...

    async def hashes_at(self, seqs: Sequence[int]) -> dict[int, str]: ...


async def external_findings(
    path: Path, chain: StoredChain, signatures: Signatures
) -> list[ExternalFinding]:
    """The checkpoint file at ``path`` held against the stored chain (``check_external``):
    the I/O around it, for a verification to add to its report."""
    external, unreadable = await asyncio.to_thread(read_checkpoint_file, path)
    await signatures.prefetch(external)
    table_end = await chain.table_end()
    hashes = await chain.hashes_at(sorted({cp.seq for cp in external if cp.seq <= table_end}))
    return check_external(
        external,
        table_end=table_end,
        hash_at=hashes,
        check_signature=signatures.check,
        unreadable_lines=unreadable,
    )


def file_checkpoints(path: Path) -> Callable[[], Awaitable[list[Checkpoint]]]:
    """The external checkpoints a verification adds to the table's (``source="file"``);
    a line that is not a checkpoint is skipped (``external_findings`` names it)."""

    async def read() -> list[Checkpoint]:
        found, _ = await asyncio.to_thread(read_checkpoint_file, path)
        return [replace(cp, source="file") for cp in found]

    return read
