"""``broker dev``: the whole system on one laptop (OpenBao dev server, SQLite, a local
identity issuer and demo roles). Also used by the test harness to start OpenBao."""

import os
from pathlib import Path


def write_private(path: Path, data: str | bytes) -> None:
    """Write a file only its owner can read (keys, tokens): created 0600, never wider."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
