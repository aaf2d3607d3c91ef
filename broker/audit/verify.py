"""Verification of the audit chain, free of I/O: events go in (oldest first, in pages),
a ``Report`` comes out.

Each event's hash is recomputed from its stored fields (``broker.leases.chain``) and its
``prev_hash`` compared with the hash of the event before it, so:

- a field changed in place (without recomputing the hash) is ``altered`` at its seq;
- an event replaced wholesale (its hash recomputed) breaks the link of the event after it
  (``broken_link``), unless every later event was rewritten too — which only a
  checkpoint signed outside the database catches (``checkpoint_mismatch``);
- a deleted event leaves a ``gap`` (and a broken link);
- two events whose places were swapped are named ``moved`` (the content of seq M found at
  seq N) or ``reordered`` (rows stored in another order than their seqs);
- a deleted tail leaves the newest checkpoint past the end (``truncated``), and so does a
  head row (``audit_head``) ahead of the last event;
- events older than ``max_uncovered`` (the checkpoint interval and a slack: event times
  are in the hash) that no checkpoint covers are ``uncovered``: the checkpoints were
  deleted (and the chain perhaps rewritten), or none was signed for that long.

A signature that cannot be checked now (Vault unreachable, a key version newer than the
ones read) is ``signature_unchecked``: not ok, but no evidence of tampering
(``Report.tampered`` is false when it is the only kind of finding).

Memory is bounded by the page, not the chain: only the previous event and a window of
recent hashes are kept (``Verifier.feed`` one page at a time). Signatures are checked by
an injected ``check_signature`` (no signer here); without one the report says
``signatures_checked: false``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from broker.leases import chain
from broker.leases.views import AuditEventView, CheckpointView

# Kinds of finding, each a way the chain does not hold (``notices`` are not findings).
ALTERED = "altered"
MOVED = "moved"
BROKEN_LINK = "broken_link"
GAP = "gap"
REORDERED = "reordered"
OUT_OF_ORDER = "out_of_order"
TRUNCATED = "truncated"
CHECKPOINT_MISMATCH = "checkpoint_mismatch"
CHECKPOINT_MISSING_EVENT = "checkpoint_missing_event"
BAD_SIGNATURE = "bad_signature"
HEAD_MISMATCH = "head_mismatch"
UNCOVERED = "uncovered"
SIGNATURE_UNCHECKED = "signature_unchecked"
# Findings that say the chain could not be fully checked, not that it was altered.
NOT_TAMPERING = frozenset({SIGNATURE_UNCHECKED})
KINDS = (
    ALTERED,
    MOVED,
    BROKEN_LINK,
    GAP,
    REORDERED,
    OUT_OF_ORDER,
    TRUNCATED,
    CHECKPOINT_MISMATCH,
    CHECKPOINT_MISSING_EVENT,
    BAD_SIGNATURE,
    HEAD_MISMATCH,
    UNCOVERED,
    SIGNATURE_UNCHECKED,
)
# A report lists this many findings at most (a rewritten table would otherwise list one
# per event); ``findings_omitted`` counts the rest.
MAX_FINDINGS = 200
# Recent stored hashes kept to name a moved event (the seq its content belongs at).
_WINDOW = 4096


@dataclass(frozen=True)
class Finding:
    kind: str
    seq: int
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seq": self.seq, "message": self.message}


@dataclass(frozen=True)
class Report:
    from_seq: int
    last_seq: int | None  # the last event read
    events: int  # how many were read
    checkpoints: int  # how many at or after ``from_seq`` were compared
    last_checkpoint_seq: int | None
    after_last_checkpoint: int  # events no checkpoint covers yet (a notice, not a finding)
    signatures_checked: bool
    findings: tuple[Finding, ...]
    findings_omitted: int = 0

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def tampered(self) -> bool:
        """Some finding is evidence of tampering (not only signatures left unchecked)."""
        return any(f.kind not in NOT_TAMPERING for f in self.findings)

    @property
    def first_bad_seq(self) -> int | None:
        return min((f.seq for f in self.findings), default=None)

    def to_dict(self) -> dict[str, Any]:
        notices = []
        if not self.signatures_checked:
            notices.append("signatures not checked: no checkpoint verifier is configured")
        if self.after_last_checkpoint:
            notices.append(
                f"{self.after_last_checkpoint} event(s) after the last checkpoint: a deleted "
                "tail among them would not be detected until the next checkpoint"
            )
        return {
            "ok": self.ok,
            "tampered": self.tampered,
            "from_seq": self.from_seq,
            "last_seq": self.last_seq,
            "events": self.events,
            "first_bad_seq": self.first_bad_seq,
            "checkpoints": self.checkpoints,
            "last_checkpoint_seq": self.last_checkpoint_seq,
            "after_last_checkpoint": self.after_last_checkpoint,
            "signatures_checked": self.signatures_checked,
            "findings": [f.to_dict() for f in self.findings],
            "findings_omitted": self.findings_omitted,
            "notices": notices,
        }


def recompute(event: AuditEventView, *, seq: int | None = None) -> str:
    """The hash the event's stored fields (with ``seq`` in place of its own) link to."""
    document = chain.event_document(
        seq=event.seq if seq is None else seq,
        at=event.at,
        actor=event.actor,
        action=event.action,
        instance_id=event.instance_id,
        lease_id=event.lease_id,
        outcome=event.outcome,
        reason=event.reason,
        detail=event.detail,
    )
    return chain.link_hash(event.prev_hash, document)


@dataclass
class Verifier:
    """Feed events oldest first (``feed``, page by page), then ``finish``.

    ``anchor``: (seq, hash) of the event just before ``from_seq`` as stored (verification
    from a later seq trusts it); ``None`` from the start of the chain (the genesis hash).
    ``checkpoints``: every checkpoint known, from the table and from outside it.
    ``head``: the chain's head row (seq, hash), compared with the last event when given.
    ``now`` and ``max_uncovered``: when both are given, an event older than ``max_uncovered``
    after the last checkpoint that holds is ``uncovered``."""

    from_seq: int = 1
    anchor: tuple[int, str] | None = None
    checkpoints: Iterable[CheckpointView] = ()
    check_signature: Callable[[CheckpointView], bool | None] | None = None
    head: tuple[int, str] | None = None
    now: datetime | None = None
    max_uncovered: timedelta | None = None
    _findings: list[Finding] = field(default_factory=list)
    _omitted: int = 0
    _prev: tuple[int, str, int | None] | None = None  # (seq, hash, row id) of the last event
    _count: int = 0
    _by_seq: dict[int, list[CheckpointView]] = field(default_factory=dict)
    _hashes: OrderedDict[str, int] = field(default_factory=OrderedDict)  # stored hash → seq
    _suspects: list[AuditEventView] = field(default_factory=list)  # altered, maybe moved
    # The oldest event after the last checkpoint that held so far: (its time, its seq).
    _uncovered: tuple[datetime, int] | None = None

    def __post_init__(self) -> None:
        self.checkpoints = tuple(self.checkpoints)
        for cp in self.checkpoints:
            if cp.seq >= self.from_seq:
                self._by_seq.setdefault(cp.seq, []).append(cp)
        if self.anchor is not None:
            self._prev = (self.anchor[0], self.anchor[1], None)
        elif self.from_seq <= 1:
            self._prev = (0, chain.GENESIS, None)

    def _find(self, kind: str, seq: int, message: str) -> None:
        if len(self._findings) < MAX_FINDINGS:
            self._findings.append(Finding(kind, seq, message))
        else:
            self._omitted += 1

    def feed(self, events: Iterable[AuditEventView]) -> None:
        for event in events:
            self._one(event)
        self._resolve_suspects(final=False)

    def _one(self, event: AuditEventView) -> None:
        self._count += 1
        prev = self._prev
        if prev is not None and event.seq <= prev[0]:
            self._find(
                OUT_OF_ORDER,
                event.seq,
                f"seq {event.seq} comes after seq {prev[0]}: events were not read in order",
            )
            return
        if prev is not None and event.seq > prev[0] + 1:
            first, last = prev[0] + 1, event.seq - 1
            what = f"seq {first}" if first == last else f"seqs {first}..{last}"
            self._find(GAP, first, f"{what} missing: {last - first + 1} event(s) deleted")
        elif prev is None and event.seq > self.from_seq:
            first, last = self.from_seq, event.seq - 1
            self._find(GAP, first, f"seqs {first}..{last} missing before the first event read")
        if prev is not None and prev[2] is not None and event.row_id < prev[2]:
            self._find(
                REORDERED,
                event.seq,
                f"seq {event.seq} was stored before seq {prev[0]}: their places were swapped",
            )
        if recompute(event) != event.hash:
            self._suspects.append(event)
            self._find(ALTERED, event.seq, f"seq {event.seq} does not match its hash: altered")
        if prev is not None and event.seq == prev[0] + 1 and event.prev_hash != prev[1]:
            self._find(
                BROKEN_LINK,
                event.seq,
                f"seq {event.seq} does not link to seq {prev[0]}: the event before it was "
                "replaced or removed",
            )
        held = [self._checkpoint(cp, event.hash) for cp in self._by_seq.pop(event.seq, [])]
        if any(held):
            self._uncovered = None
        elif self._uncovered is None or event.at < self._uncovered[0]:
            self._uncovered = (event.at, event.seq)
        self._hashes[event.hash] = event.seq
        if len(self._hashes) > _WINDOW:
            self._hashes.popitem(last=False)
        self._prev = (event.seq, event.hash, event.row_id)

    def _resolve_suspects(self, *, final: bool) -> None:
        """An altered event whose content hashes right under another seq was moved there
        (its predecessor, by its ``prev_hash``, is in the window of recent events)."""
        keep = []
        for event in self._suspects:
            before = self._hashes.get(event.prev_hash)
            if before is None and event.prev_hash == chain.GENESIS:
                before = 0
            if before is not None and recompute(event, seq=before + 1) == event.hash:
                self._findings = [
                    f for f in self._findings if not (f.kind == ALTERED and f.seq == event.seq)
                ]
                self._find(
                    MOVED,
                    event.seq,
                    f"seq {event.seq} holds the event of seq {before + 1}: events were reordered",
                )
            elif not final:
                keep.append(event)
        # Kept one page longer: the predecessor of a moved event may come later.
        self._suspects = keep if len(keep) <= _WINDOW else []

    def _checkpoint(self, cp: CheckpointView, event_hash: str | None) -> bool:
        """Compare a checkpoint with the event it names; whether it holds (its signature
        verifies, when signatures are checked, and it names the event's hash)."""
        where = f"checkpoint at seq {cp.seq} ({cp.source})"
        held = True
        if event_hash is not None and cp.hash != event_hash:
            held = False
            self._find(
                CHECKPOINT_MISMATCH,
                cp.seq,
                f"{where} says hash {cp.hash[:16]}…, the event has {event_hash[:16]}…",
            )
        if self.check_signature is not None:
            verdict = self.check_signature(cp)
            if verdict is None:
                held = False
                self._find(
                    SIGNATURE_UNCHECKED,
                    cp.seq,
                    f"{where}: its signature could not be checked (key {cp.key_id} could not "
                    "be read: Vault unreachable, or the key was rotated just now); run again",
                )
            elif not verdict:
                held = False
                self._find(BAD_SIGNATURE, cp.seq, f"{where}: its signature does not verify")
        return held

    def finish(self) -> Report:
        self._resolve_suspects(final=True)
        last = self._prev[0] if self._prev is not None and self._count else None
        end = last if last is not None else (self.anchor[0] if self.anchor else 0)
        compared = sum(1 for cp in self.checkpoints if cp.seq >= self.from_seq and cp.seq <= end)
        for seq in sorted(self._by_seq):
            for cp in self._by_seq[seq]:
                if seq > end:
                    self._find(
                        TRUNCATED,
                        end + 1,
                        f"checkpoint at seq {seq} ({cp.source}) is past the last event "
                        f"(seq {end}): events {end + 1}..{seq} were deleted",
                    )
                    self._checkpoint(cp, None)
                else:
                    self._find(
                        CHECKPOINT_MISSING_EVENT,
                        seq,
                        f"checkpoint at seq {seq} ({cp.source}) names an event that is missing",
                    )
        if self.head is not None and self._prev is not None:
            head_seq, head_hash = self.head
            if head_seq > end:
                self._find(
                    TRUNCATED,
                    end + 1,
                    f"the chain's head is at seq {head_seq}, the last event at seq {end}: "
                    f"events {end + 1}..{head_seq} were deleted",
                )
            elif head_seq == end and self._count and head_hash != self._prev[1]:
                self._find(
                    HEAD_MISMATCH, end, f"the chain's head hash differs from seq {end}'s hash"
                )
        if self._uncovered is not None and self.now is not None and self.max_uncovered is not None:
            at, seq = self._uncovered
            if self.now - at > self.max_uncovered:
                self._find(
                    UNCOVERED,
                    seq,
                    f"events from seq {seq} on (the oldest at {at.isoformat()}) are older than "
                    f"{int(self.max_uncovered.total_seconds())}s and no checkpoint that holds "
                    "covers them: checkpoints were deleted (the events may have been rewritten), "
                    "or none was signed for that long (see broker_audit_checkpoint_failures)",
                )
        last_cp = max((cp.seq for cp in self.checkpoints if cp.seq <= end), default=None)
        after = end - max(last_cp or 0, self.from_seq - 1) if self._count else 0
        findings = sorted(self._findings, key=lambda f: (f.seq, KINDS.index(f.kind)))
        return Report(
            from_seq=self.from_seq,
            last_seq=last,
            events=self._count,
            checkpoints=compared,
            last_checkpoint_seq=last_cp,
            after_last_checkpoint=max(after, 0),
            signatures_checked=self.check_signature is not None,
            findings=tuple(findings),
            findings_omitted=self._omitted,
        )


def verify(
    events: Iterable[AuditEventView],
    checkpoints: Iterable[CheckpointView] = (),
    *,
    from_seq: int = 1,
    anchor: tuple[int, str] | None = None,
    check_signature: Callable[[CheckpointView], bool | None] | None = None,
    head: tuple[int, str] | None = None,
    now: datetime | None = None,
    max_uncovered: timedelta | None = None,
) -> Report:
    """Verify a whole sequence of events at once (``Verifier`` for pages)."""
    verifier = Verifier(
        from_seq=from_seq,
        anchor=anchor,
        checkpoints=tuple(checkpoints),
        check_signature=check_signature,
        head=head,
        now=now,
        max_uncovered=max_uncovered,
    )
    verifier.feed(events)
    return verifier.finish()

