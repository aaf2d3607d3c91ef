"""``broker dev`` never pairs an old store with a fresh OpenBao.

OpenBao's dev server keeps everything in memory: every ``broker dev`` start has a new
one, which knows none of the previous run's leases, tokens or transit keys. A store left
by that run would list leases no Vault can revoke any more (a revocation would find them
"unknown"), and audit checkpoints signed by a transit key that no longer exists. So
everything tied to the previous OpenBao moves aside, together, before anything starts.

Moved, not deleted: the old store is the only record of what the lost OpenBao handed
out (its ``dev-db`` logins stay in PostgreSQL until their ``VALID UNTIL``) and of its
audit trail; keeping it costs a few kilobytes under ``previous/``.

A lock on the directory keeps a second ``broker dev`` from moving the store of one that
still runs there; the kernel drops it when the process ends, even by SIGKILL.
"""

from __future__ import annotations

import fcntl
import os
from datetime import datetime
from pathlib import Path

from broker.errors import ConfigError

# Everything in the dev directory that belongs to one OpenBao dev server's lifetime. The
# issuer key, ca.pem and dev.env are rewritten on every start anyway.
TIED_TO_OPENBAO = (
    "broker.db",
    "broker.db-wal",
    "broker.db-shm",
    "broker.db-journal",
    "audit-checkpoints.jsonl",
)
PREVIOUS = "previous"
LOCK = "dev.lock"


def hold_directory(d: Path) -> int:
    """Lock ``d`` for this run; the returned descriptor holds it until closed. Refuses
    if another ``broker dev`` holds it."""
    fd = os.open(d / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"{d}: another `broker dev` is running on this directory; stop it or pass --dir"
        ) from None
    return fd


def set_aside_previous_run(d: Path, now: datetime) -> Path | None:
    """Move what a previous run left (its store, its audit checkpoints) to
    ``previous/<UTC time>/`` in ``d``; that directory, or None if there was nothing."""
    found = [d / name for name in TIED_TO_OPENBAO if (d / name).exists()]
    if not found:
        return None
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    target = d / PREVIOUS / stamp
    n = 1
    while target.exists():  # two starts within one second
        n += 1
        target = d / PREVIOUS / f"{stamp}-{n}"
    target.mkdir(parents=True, mode=0o700)
    for path in found:
        path.rename(target / path.name)
    return target


def fresh_start_line(moved: Path) -> str:
    """The one line ``broker dev`` prints when it set a previous run aside."""
    return (
        "broker dev: starting fresh (OpenBao dev keeps nothing between runs): the previous "
        f"run's store and audit checkpoints moved to {moved}/"
    )
