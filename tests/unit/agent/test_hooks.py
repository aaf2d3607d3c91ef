"""Rotation hooks: a command runs as an exec array (no shell), its output is not kept,
a command that runs too long is killed; a signal reaches every process of the given
name and no other."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from broker.agent import hooks


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


async def test_signal_reaches_processes_of_that_name_only(tmp_path: Path) -> None:
    name = f"rot-{os.getpid() % 100000}"[:15]
    script = tmp_path / name
    script.write_text("#!/bin/sh\ntrap 'echo hup >> \"$1\"' HUP\n"
                      "while :; do sleep 0.05; done\n")
    script.chmod(0o755)
    marks = [tmp_path / "one", tmp_path / "two"]
    procs = [subprocess.Popen([str(script), str(m)]) for m in marks]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        async def named() -> list[int]:
            return hooks.processes_named(name)

        for _ in range(200):
            if sorted(await named()) == sorted(p.pid for p in procs):
                break
            await asyncio.sleep(0.05)
        assert sorted(await named()) == sorted(p.pid for p in procs)
        assert hooks.send_signal(signal.SIGHUP, name) == 2
        for _ in range(200):
            if all(m.exists() for m in marks):
                break
            await asyncio.sleep(0.05)
        assert [m.read_text() for m in marks] == ["hup\n", "hup\n"]
        assert other.poll() is None
        assert hooks.send_signal(signal.SIGHUP, "no-such-proc") == 0
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
