"""The state file: a round trip keeps every field, holds lease ids and times only, is
written atomically with mode 0600, and a damaged file means starting afresh, not dying."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.agent import state
from broker.agent.state import AgentState, Entry, Lease, Retired

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
LEASE = Lease("l-" + "a" * 32, True, True, T0, T0 + timedelta(minutes=10),
              T0 + timedelta(seconds=5), T0 + timedelta(hours=1), True)
FULL = AgentState(
    {"db": Entry("orders", "d" * 32, ("db",), LEASE),
     "tls": Entry("cert", "e" * 32, ("tls-ca.crt", "tls.crt", "tls.key"),
                  Lease("l-" + "b" * 32, True, False, T0, T0 + timedelta(minutes=5), T0),
                  key_param="csr")},
    (Retired("l-" + "c" * 32, T0 + timedelta(seconds=30), T0 + timedelta(minutes=3)),),
)


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / ".agent-state.json"
    state.save(path, FULL)
    assert state.load(path) == (FULL, None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["version"] == 1
    assert set(doc["credentials"]["db"]) == {"role", "digest", "files", "lease", "key_param"}
    assert set(doc["credentials"]["db"]["lease"]) == {
        "lease_id", "leased", "renewable", "issued_at", "expires_at", "seen_at",
        "max_expires_at", "near_max"}
    assert [p.name for p in tmp_path.iterdir()] == [".agent-state.json"]  # no temp file left


def test_with_entry_and_retired_leave_the_original_alone() -> None:
    empty = AgentState()
    one = empty.with_entry("db", FULL.credentials["db"])
    assert (empty.credentials, dict(one.credentials)) == ({}, {"db": FULL.credentials["db"]})
    assert one.with_entry("db", None).credentials == {}
    assert one.with_retired(FULL.retired).retired == FULL.retired and one.retired == ()


def test_missing_file_is_an_empty_state(tmp_path: Path) -> None:
    assert state.load(tmp_path / "none.json") == (AgentState(), None)


def _doc(**changes: object) -> bytes:
    doc = json.loads(state.encode(FULL))
    doc.update(changes)
    return json.dumps(doc).encode()


def _lease_doc(**changes: object) -> bytes:
    doc = json.loads(state.encode(FULL))
    doc["credentials"]["db"]["lease"].update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"[]", b"null", _doc(version=2), _doc(version=None),
    _doc(credentials={"db": {"role": "x"}}), _lease_doc(lease_id="../../v1/sys"),
    _lease_doc(lease_id="l-short"), _lease_doc(expires_at="tomorrow"),
    _lease_doc(expires_at="2030-01-01T00:00:00"), _lease_doc(issued_at=5),
    _doc(retired=[{"lease_id": "x", "release_at": "2030-01-01T00:00:00+00:00",
                   "expires_at": "2030-01-01T00:00:00+00:00"}]),
    _doc(credentials=[]),
], ids=["empty", "garbage", "list", "null", "newer-version", "no-version", "entry-missing-fields",
        "lease-id-path", "lease-id-short", "time-words", "time-without-zone", "time-number",
        "retired-bad-id", "credentials-list"])
def test_a_damaged_file_means_starting_afresh(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(raw)
    assert state.load(path) == (AgentState(), "it is not a state document this agent wrote")


def test_too_large_and_unreadable(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (state.MAX_STATE_BYTES + 1))
    assert state.load(big) == (AgentState(), "it is too large")
    directory = tmp_path / "dir.json"
    directory.mkdir()
    loaded, problem = state.load(directory)
    assert loaded == AgentState() and problem is not None and problem.startswith("cannot read")
