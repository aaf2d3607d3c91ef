"""``broker dev`` sets a previous run's store aside (moved, not deleted) before a fresh
OpenBao starts, and refuses a second run on a directory one still holds."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.dev.fresh import (
    TIED_TO_OPENBAO,
    fresh_start_line,
    hold_directory,
    set_aside_previous_run,
)
from broker.errors import ConfigError

NOW = datetime(2026, 12, 2, 16, 5, 7, tzinfo=UTC)


def test_a_first_run_moves_nothing(tmp_path: Path) -> None:
    (tmp_path / "issuer.json").write_text("{}")  # rewritten every start: not tied
    assert set_aside_previous_run(tmp_path, NOW) is None
    assert not (tmp_path / "previous").exists()


def test_a_previous_store_and_its_checkpoints_move_together(tmp_path: Path) -> None:
    for name in ("broker.db", "broker.db-wal", "audit-checkpoints.jsonl", "issuer.json"):
        (tmp_path / name).write_text(name)
    moved = set_aside_previous_run(tmp_path, NOW)
    assert moved == tmp_path / "previous" / "20261202T160507Z"
    assert sorted(p.name for p in moved.iterdir()) == [
        "audit-checkpoints.jsonl", "broker.db", "broker.db-wal"]
    assert (moved / "broker.db").read_text() == "broker.db"  # moved, not emptied
    assert not any((tmp_path / name).exists() for name in TIED_TO_OPENBAO)
    assert (tmp_path / "issuer.json").exists()
    # the same second again: a directory of its own, nothing overwritten
    (tmp_path / "broker.db").write_text("second")
    again = set_aside_previous_run(tmp_path, NOW)
    assert again == tmp_path / "previous" / "20261202T160507Z-2"
    assert (again / "broker.db").read_text() == "second"
    assert (moved / "broker.db").read_text() == "broker.db"


def test_the_line_says_where(tmp_path: Path) -> None:
    line = fresh_start_line(Path(".broker-dev/previous/20261202T160507Z"))
    assert "\n" not in line
    assert line.endswith(".broker-dev/previous/20261202T160507Z/")
    assert "starting fresh" in line


def test_a_directory_held_by_a_running_dev_is_refused(tmp_path: Path) -> None:
    import os
    fd = hold_directory(tmp_path)
    try:
        with pytest.raises(ConfigError, match="another `broker dev` is running"):
            hold_directory(tmp_path)
    finally:
        os.close(fd)
    os.close(hold_directory(tmp_path))  # released with its holder
