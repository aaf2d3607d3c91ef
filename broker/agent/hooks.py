"""Telling the workload that a credential changed: a command (an exec array, never a
shell string) run with a time bound, and/or a signal sent to every process of a given
name in the pod (``shareProcessNamespace: true`` makes the app's processes visible in
``/proc``). A command's output is discarded, not logged: it could print the credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("broker.agent")

COMMAND_TIMEOUT_S = 30.0


async def run_command(
    argv: Sequence[str], cwd: Path, timeout: float = COMMAND_TIMEOUT_S
) -> int | None:
    """The command's exit status; None if it could not start or ran past ``timeout``
    (then it is killed, with its children). Cancelled, it kills them too before the
    cancellation goes on."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        log.warning(
            "rotation command could not start", extra={"program": argv[0], "reason": exc.strerror}
        )
        return None
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        _kill_group(proc)
        await proc.wait()
        log.warning(
            "rotation command ran too long and was killed",
            extra={"program": argv[0], "timeout_s": timeout},
        )
        return None
    except asyncio.CancelledError:
        # The agent is stopping. The command has a session of its own (so its children can
        # be killed with it), which also means nothing else would ever end it: it would
        # outlive the agent, still holding what it read of the credential.
        _kill_group(proc)
        await proc.wait()
        log.warning("rotation command killed: the agent is stopping", extra={"program": argv[0]})
        raise


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the command and every process of its group (its children, even where the
    command itself has just ended: the group lives as long as one of them does)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def processes_named(name: str, proc: Path = Path("/proc")) -> list[int]:
    """The pids whose ``comm`` is ``name`` (not this process)."""
    me = os.getpid()
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            comm = (entry / "comm").read_text().rstrip("\n")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if comm == name:
            found.append(int(entry.name))
    return sorted(found)


def send_signal(signal_number: int, name: str, proc: Path = Path("/proc")) -> tuple[int, int]:
    """Send the signal to every process named ``name``: (how many received it, how many
    could not be signalled). Without capabilities (the agent drops them all) a process
    can signal only processes of its own user: the app must run as the agent's user."""
    sent = denied = 0
    for pid in processes_named(name, proc):
        try:
            os.kill(pid, signal_number)
            sent += 1
        except ProcessLookupError:
            continue
        except PermissionError:
            denied += 1
    return sent, denied
