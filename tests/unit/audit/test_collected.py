"""Checkpoints an operator collected (every replica's file, the audit.checkpoint log lines)
read for a verification: both line forms, blank lines, duplicates across files kept once,
a line that is not a checkpoint named by its number (the request's, or FILE:LINE in
brokerctl); and held against a chain, the collected set catches a cut tail and an edited
line is a finding, never trusted."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import replace

import pytest

from broker.api.admin import collected_of
from broker.audit.checkpoint import Checkpoint, document, file_line
from broker.audit.collected import (
    MAX_CHECKPOINTS,
    MAX_LINE,
    NotACheckpoint,
    collect,
    gather,
    parse_collected,
)
from broker.audit.verify import (
    BAD_SIGNATURE,
    CHECKPOINT_MISMATCH,
    CHECKPOINT_MISSING_EVENT,
    TRUNCATED,
    verify,
)
from broker.cli.ctl_audit import collected_lines
from broker.cli.ctlbase import EXIT_USAGE, CtlError
from broker.errors import BadRequest
from broker.logs import JsonFormatter
from tests.unit.audit.test_verify import kinds, make_chain


def cp_of(event, signature: str = "sig") -> Checkpoint:
    return Checkpoint(event.seq, event.hash, event.at, "file", "file:k1", signature)


def log_line(cp: Checkpoint) -> str:
    """The log record the checkpoint writer logs, as the broker's formatter writes it."""
    record = logging.LogRecord("broker.audit.writer", logging.INFO, __file__, 1,
                               "audit.checkpoint", None, None)
    record.checkpoint = document(cp)
    return JsonFormatter().format(record)


CHAIN = make_chain(9)
CP3, CP6, CP9 = (cp_of(CHAIN[i - 1]) for i in (3, 6, 9))


def test_a_file_line_and_a_log_record_are_the_same_checkpoint():
    assert parse_collected(file_line(CP6)) == CP6
    assert parse_collected(log_line(CP6)) == CP6


@pytest.mark.parametrize("line", [
    "{torn",
    "[1, 2]",
    '"a string"',
    "5",
    json.dumps({"msg": "request", "checkpoint": document(CP3)}),  # not the checkpoint line
    json.dumps({"msg": "audit.checkpoint"}),
    json.dumps({"msg": "audit.checkpoint", "checkpoint": "x"}),
    json.dumps({**document(CP3), "at": "2026-01-01T12:00:00"}),  # no zone
    json.dumps({k: v for k, v in document(CP3).items() if k != "signature"}),
    "[" * 5000,
    json.dumps(document(CP3)).replace('"seq": 3', '"seq": 1e400'),
    file_line(CP3) + " " * MAX_LINE,
], ids=["torn", "list", "string", "number", "other-log", "log-without", "log-not-object",
        "naive-time", "no-signature", "deep", "seq-infinite", "too-long"])
def test_what_is_not_a_checkpoint(line):
    assert parse_collected(line) is None


def test_collect_skips_blank_lines_keeps_each_checkpoint_once_and_marks_it_collected():
    lines = [file_line(CP3), "", "  ", log_line(CP3), file_line(CP6), file_line(CP3)]
    found = collect(lines)
    assert found == [replace(CP3, source="collected"), replace(CP6, source="collected")]
    assert collect(lines, from_seq=4) == [replace(CP6, source="collected")]


def test_collect_names_the_line_that_is_not_a_checkpoint():
    with pytest.raises(NotACheckpoint) as caught:
        collect([file_line(CP3), "", "{torn", "also bad"])
    assert caught.value.where == "3" and "line 3 is not an audit checkpoint" in str(caught.value)
    with pytest.raises(NotACheckpoint, match="longer than"):
        collect(["x" * (MAX_LINE + 1)])


def test_gather_dedupes_across_files_and_names_file_and_line():
    a = f"{file_line(CP3)}\n{file_line(CP6)}\n"
    b = f"\n{log_line(CP6)}\n{file_line(CP9)}\n"
    assert gather([("a", a), ("b", b)]) == [file_line(CP3), file_line(CP6), file_line(CP9)]
    assert gather([("a", a), ("b", b)], from_seq=7) == [file_line(CP9)]
    with pytest.raises(NotACheckpoint) as caught:
        gather([("a", a), ("b.jsonl", b + "{torn\n")])
    assert caught.value.where == "b.jsonl:4"


def test_brokerctl_reads_files_and_stdin_and_refuses_bad_input(tmp_path, monkeypatch):
    (tmp_path / "a").write_text(file_line(CP3) + "\n" + file_line(CP6) + "\n")
    monkeypatch.setattr("sys.stdin", io.StringIO(log_line(CP6) + "\n" + log_line(CP9) + "\n"))
    lines = collected_lines([str(tmp_path / "a"), "-"], 1)
    assert [parse_collected(x).seq for x in lines] == [3, 6, 9]
    for names, needle in (
        ([str(tmp_path / "missing")], "No such file"),
        ([str(tmp_path / "a"), str(tmp_path)], "Is a directory"),
    ):
        with pytest.raises(CtlError) as caught:
            collected_lines(names, 1)
        assert caught.value.exit_code == EXIT_USAGE and needle in str(caught.value)
    (tmp_path / "bad").write_text(file_line(CP3) + "\nnot json\n")
    with pytest.raises(CtlError, match=r"bad:2 is not an audit checkpoint") as caught:
        collected_lines([str(tmp_path / "bad")], 1)
    assert caught.value.exit_code == EXIT_USAGE
    (tmp_path / "latin").write_bytes(b"\xff\xfe")
    with pytest.raises(CtlError, match="not UTF-8"):
        collected_lines([str(tmp_path / "latin")], 1)


def test_brokerctl_refuses_more_than_one_verification_takes(tmp_path, monkeypatch):
    many = make_chain(MAX_CHECKPOINTS + 1)
    (tmp_path / "many").write_text("\n".join(file_line(cp_of(e)) for e in many))
    with pytest.raises(CtlError, match="--from SEQ") as caught:
        collected_lines([str(tmp_path / "many")], 1)
    assert caught.value.exit_code == EXIT_USAGE
    assert len(collected_lines([str(tmp_path / "many")], 2)) == MAX_CHECKPOINTS


@pytest.mark.parametrize("raw,needle", [
    ("x", "must be a list"),
    ([1], "must be a list"),
    (None, "must be a list"),
    ([file_line(CP3)] * (MAX_CHECKPOINTS + 1), f"at most {MAX_CHECKPOINTS}"),
    ([file_line(CP3), "", "{torn"], "line 3 is not an audit checkpoint"),
])
def test_the_request_s_checkpoints_are_refused_with_a_reason(raw, needle):
    with pytest.raises(BadRequest) as caught:
        collected_of(raw, 1)
    assert caught.value.code == "invalid_checkpoints" and needle in caught.value.message


def test_the_request_s_checkpoints_decode():
    assert collected_of([], 1) == []
    assert collected_of([file_line(CP3), log_line(CP3), log_line(CP9)], 4) == [
        replace(CP9, source="collected")]


def _genuine(cp: Checkpoint) -> bool:
    return cp.signature == "sig" and any(cp.seq == e.seq and cp.hash == e.hash for e in CHAIN)


def test_the_collected_set_catches_a_tail_no_one_file_names():
    """Replica a's file ends at 6, replica b's names 9; events 8 and 9 were deleted and
    the head moved back: a's file alone finds nothing, both together find the cut."""
    cut = CHAIN[:7]
    alone = verify(cut, [CP3, *collect([file_line(CP3), file_line(CP6)])],
                   check_signature=_genuine, head=(7, cut[-1].hash))
    assert alone.ok
    both = verify(cut, [CP3, *collect([file_line(CP3), file_line(CP6), log_line(CP9)])],
                  check_signature=_genuine, head=(7, cut[-1].hash))
    assert kinds(both) == [(TRUNCATED, 8)] and both.tampered
    assert "(collected)" in both.findings[0].message


def test_an_edited_collected_line_is_a_finding_not_trusted():
    edited = replace(CP9, seq=6)  # claims event 6 has event 9's hash
    report = verify(CHAIN, collect([file_line(edited)]), check_signature=_genuine)
    assert kinds(report) == [(CHECKPOINT_MISMATCH, 6), (BAD_SIGNATURE, 6)]
    forged = replace(CP6, signature="forged")
    report = verify(CHAIN, collect([file_line(forged)]), check_signature=_genuine)
    assert kinds(report) == [(BAD_SIGNATURE, 6)]


def test_a_collected_checkpoint_of_a_deleted_event_is_named():
    holed = [e for e in CHAIN if e.seq != 6]
    report = verify(holed, collect([file_line(CP6)]), check_signature=_genuine,
                    head=(9, CHAIN[-1].hash))
    assert (CHECKPOINT_MISSING_EVENT, 6) in kinds(report) and report.tampered
