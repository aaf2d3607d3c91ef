"""Atomic credential files: the permissions are right from the first byte on disk, a
replaced file is swapped whole (a reader holding the old one keeps it), a key is written
before its certificate, and temporary files a killed agent left are cleaned up."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from broker.agent import files


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("perms", [0o400, 0o440, 0o444, 0o600, 0o640, 0o000],
                         ids=lambda p: f"{p:04o}")
def test_written_with_its_permissions_whatever_the_umask(tmp_path: Path, perms: int) -> None:
    old = os.umask(0o077)
    try:
        files.write_atomic(tmp_path, "c", b"secret\n", perms)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "c") == perms
    os.chmod(tmp_path / "c", 0o600)
    assert (tmp_path / "c").read_bytes() == b"secret\n"


def test_replaced_whole_and_a_reader_keeps_the_old_file(tmp_path: Path) -> None:
    files.write_atomic(tmp_path, "c", b"old", 0o400)
    with open(tmp_path / "c", "rb") as reader:
        files.write_atomic(tmp_path, "c", b"new" * 100_000, 0o400)
        assert reader.read() == b"old"
    assert (tmp_path / "c").read_bytes() == b"new" * 100_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_a_symlink_in_place_of_the_file_is_replaced_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    (tmp_path / "c").symlink_to(target)
    files.write_atomic(tmp_path, "c", b"new", 0o400)
    assert not (tmp_path / "c").is_symlink()
    assert target.read_bytes() == b"keep"


def test_write_all_writes_the_key_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    real = files.write_atomic

    def spy(directory: Path, name: str, content: bytes, perms: int) -> None:
        order.append(name)
        real(directory, name, content, perms)

    monkeypatch.setattr(files, "write_atomic", spy)
    files.write_all(tmp_path, {"t.crt": b"c", "t-ca.crt": b"a", "t.key": b"k"}, 0o440)
    assert order == ["t.key", "t-ca.crt", "t.crt"]
    assert {p.name: _mode(p) for p in tmp_path.iterdir()} == dict.fromkeys(order, 0o440)


def test_presence(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"")
    assert files.all_present(tmp_path, ["a"]) and not files.all_present(tmp_path, ["a", "b"])
    assert files.existing(tmp_path, ["b", "a"]) and not files.existing(tmp_path, ["b"])
    (tmp_path / "d").mkdir()
    assert not files.all_present(tmp_path, ["d"])


def test_leftover_temporary_files_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".tmp-db.1234abcd").write_bytes(b"half")
    (tmp_path / "db").write_bytes(b"whole")
    (tmp_path / ".agent-state.json").write_bytes(b"{}")
    assert files.remove_leftovers(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".agent-state.json", "db"]
