"""The agent's own process, kept out of reach of the app it may share a uid with.

The injector runs the agent as the app's uid where the app has one (so that the files are
the app's to read and a rotation signal reaches it), and a pod that wants signals shares
its process namespace. Together that would let the app read the agent's mounts, among
them its broker token, through ``/proc/<agent>/root``, and its memory and environment:
the kernel allows that to any process of the same uid. A process that is not "dumpable"
is exempt: its ``/proc`` entries are root's, reachable only with ``CAP_SYS_PTRACE``,
which no container of a ``restricted`` pod has. Signals are unaffected.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger("broker.agent")

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def not_dumpable() -> bool:
    """Make this process not dumpable (Linux); False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning(
            "cannot make the agent's process undumpable: a process of its uid in a shared "
            "process namespace can read its mounts",
            extra={"errno": ctypes.get_errno()},
        )
        return False
    return bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0)
