"""Rotation hooks: a command runs as an exec array (no shell), its output is not kept,
a command that runs too long is killed; a signal reaches every process of the given
name and no other."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from broker.agent import hooks
from tests.harness.agent import named_app
from tests.harness.wait import eventually


async def test_command_runs_as_an_exec_array(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    code = await hooks.run_command(["sh", "-c", 'echo "$0" > ran; echo noise; exit 3',
                                    "x; rm -rf /"], tmp_path)
    assert code == 3
    assert marker.read_text() == "x; rm -rf /\n"  # an argument, never shell text


async def test_command_that_cannot_start(tmp_path: Path) -> None:
    assert await hooks.run_command([str(tmp_path / "missing")], tmp_path) is None


async def test_command_past_its_time_is_killed_with_its_children(tmp_path: Path) -> None:
    started = time.monotonic()
    code = await hooks.run_command(["sh", "-c", "sleep 60 & sleep 60"], tmp_path, timeout=0.5)
    assert code is None and time.monotonic() - started < 30


def _running(pid: int) -> bool:
    """Running, not a zombie nobody reaped (pid 1 of a container may never reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


async def test_a_command_still_running_when_the_agent_stops_is_killed_with_its_children(
        tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # The command and a child of it; both would run a minute past the agent.
    task = asyncio.create_task(hooks.run_command(
        ["sh", "-c", 'sleep 60 & echo "$$ $!" > pids.tmp; mv pids.tmp pids; wait'], tmp_path))
    await eventually(pids.exists, "the command started")
    command, child = map(int, pids.read_text().split())
    assert _running(command) and _running(child)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: not _running(command) and not _running(child),
                     "the command and its child are gone")


async def test_signal_reaches_processes_of_that_name_only(tmp_path: Path) -> None:
    name = f"rot-{os.getpid() % 100000}"[:15]
    marks = [tmp_path / "one", tmp_path / "two"]
    procs = [named_app(name, m) for m in marks]
    # A bystander that waits for a signal: SIGHUP would end it, so it still running
    # afterwards shows it was not signalled.
    other = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    try:
        assert hooks.processes_named(name) == sorted(p.pid for p in procs)
        assert hooks.send_signal(signal.SIGHUP, name) == (2, 0)
        # The file exists a moment before the handler's write lands in it: wait for the
        # content, not the file (seen as a flake under load).
        await eventually(lambda: all(m.exists() and m.read_text() == "hup\n" for m in marks),
                         lambda: f"both apps got SIGHUP: {[m.exists() for m in marks]}")
        assert other.poll() is None
        assert hooks.send_signal(signal.SIGHUP, "no-such-proc") == (0, 0)
    finally:
        for p in (*procs, other):
            p.kill()
            p.wait()


def test_processes_named_reads_comm(tmp_path: Path) -> None:
    for pid, comm in (("12", "nginx\n"), ("13", "nginx-worker\n"), ("14", "nginx\n"),
                      ("self", "nginx\n"), (str(os.getpid()), "nginx\n")):
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "comm").write_text(comm)
    (tmp_path / "15").mkdir()  # a process that went away: no comm
    assert hooks.processes_named("nginx", tmp_path) == [12, 14]


def test_a_process_of_another_user_is_counted_not_signalled(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        # Signal 0 only asks whether a signal would be allowed: pid 1 is not ours.
        (tmp_path / "1").mkdir()
        (tmp_path / "1" / "comm").write_text("init\n")
        assert hooks.send_signal(0, "init", tmp_path) == (0, 1)
        return
    # As root: a process of one user, signalled from a child running as another.
    # ``sleep infinity`` under a name of its own: one process that never forks (a shell
    # loop's children carry its name between fork and exec), running as another user
    # (who cannot reach the venv's python under /root). Popen returns after the exec, so
    # the name is already there.
    name = f"oth-{os.getpid() % 100000}"[:15]
    directory = Path(tempfile.mkdtemp(prefix="agent-hooks-"))
    directory.chmod(0o755)
    program = directory / name
    shutil.copy(shutil.which("sleep") or "/bin/sleep", program)
    program.chmod(0o755)
    other = subprocess.Popen([str(program), "infinity"], user=65534, cwd="/")
    try:
        assert hooks.processes_named(name) == [other.pid]
        pid = os.fork()
        if pid == 0:  # a child that drops to yet another user, as the agent runs
            try:
                os.setgroups([])
                os.setgid(65533)
                os.setuid(65533)
                os._exit(10 + sum(hooks.send_signal(signal.SIGTERM, name)[i] * (i * 2 + 1)
                                  for i in (0, 1)))
            except BaseException:
                os._exit(99)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 10 + 3  # 0 sent, 1 not permitted
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
        shutil.rmtree(directory)

