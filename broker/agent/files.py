"""Writing credential files so that a reader never sees half of one: each file is written
to a temporary file in the same directory (created with the final permissions, so it is
never readable by more than it should be), flushed to disk, and renamed over the old one;
then the directory entry itself is flushed. A reader holding the old file keeps reading
the old credential; the next open gets the new one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

_TMP_PREFIX = ".tmp-"


def write_atomic(directory: Path, name: str, content: bytes, perms: int) -> None:
    final = directory / name
    tmp = directory / f"{_TMP_PREFIX}{name}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, perms)
    try:
        os.fchmod(fd, perms)  # the umask may have taken bits the credential asks for
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    sync_directory(directory)


def sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(directory: Path, files: Mapping[str, bytes], perms: int) -> None:
    """Every file of one credential; a private key before the certificate it goes with,
    so that a reader who finds a new certificate also finds its key."""
    for name in sorted(files, key=lambda n: (not n.endswith(".key"), n)):
        write_atomic(directory, name, files[name], perms)


def all_present(directory: Path, names: Iterable[str]) -> bool:
    return all((directory / n).is_file() for n in names)


def existing(directory: Path, names: Iterable[str]) -> bool:
    return any((directory / n).exists() for n in names)


def remove_leftovers(directory: Path) -> int:
    """Temporary files a killed agent left behind; how many were removed."""
    removed = 0
    for path in directory.glob(f"{_TMP_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed
