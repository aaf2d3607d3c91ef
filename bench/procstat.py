"""CPU time of the bench's processes, read from /proc, and what the machine is.

A process's own line in ``/proc/PID/stat`` already sums every thread it has or had
(fields 14 and 15, utime and stime, in clock ticks), so one read per process covers a Go
server's or a Python process's threads. PostgreSQL is many processes: every process named
``postgres`` on the machine, plus the postmaster's reaped children (fields 16 and 17,
cutime and cstime) for backends that ended between two samples — the whole server, other
databases' work included. Linux only; the parsers are pure, the readers do the I/O.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def stat_fields(text: str) -> list[str]:
    """The fields of a ``/proc/PID/stat`` line from field 3 on (the command, field 2, is
    in parentheses and may hold spaces or parentheses itself)."""
    return text[text.rindex(")") + 2 :].split()


def own_ticks(text: str) -> int:
    """utime + stime (fields 14, 15) of a stat line: the process and all its threads."""
    f = stat_fields(text)
    return int(f[11]) + int(f[12])


def reaped_ticks(text: str) -> int:
    """cutime + cstime (fields 16, 17): children the process has waited for."""
    f = stat_fields(text)
    return int(f[13]) + int(f[14])


def parent_pid(text: str) -> int:
    return int(stat_fields(text)[1])


def machine_busy_ticks(text: str) -> int:
    """Busy ticks of all CPUs from ``/proc/stat``'s first line: everything but idle and
    iowait (guest time is already inside user)."""
    f = text.splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return user + nice + system + irq + softirq + steal


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None  # it ended between listing and reading


def process_seconds(pid: int) -> float:
    """CPU seconds a process (all its threads) has used; 0 if it is gone."""
    text = _read(PROC / str(pid) / "stat")
    return own_ticks(text) / CLK_TCK if text else 0.0


def postgres_seconds() -> float:
    """CPU seconds of the whole PostgreSQL server on this machine: every live process named
    ``postgres`` and what its postmaster reaped. A backend that ended between two samples
    is in the second one through the postmaster's cutime, its earlier part in the first
    one through its own line: the difference is its time in between."""
    lines: dict[int, str] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or _read(entry / "comm") != "postgres\n":
            continue
        text = _read(entry / "stat")
        if text:
            lines[int(entry.name)] = text
    ticks = sum(own_ticks(t) for t in lines.values())
    ticks += sum(reaped_ticks(t) for t in lines.values() if parent_pid(t) not in lines)
    return ticks / CLK_TCK


def machine_seconds() -> float:
    text = _read(PROC / "stat")
    return machine_busy_ticks(text) / CLK_TCK if text else 0.0


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far by each measured party, at one instant."""

    broker: float
    openbao: float
    postgres: float
    client: float
    machine: float

    def minus(self, earlier: CpuSample) -> dict[str, float]:
        return {
            "broker": self.broker - earlier.broker,
            "openbao": self.openbao - earlier.openbao,
            "postgres": self.postgres - earlier.postgres,
            "client": self.client - earlier.client,
            "machine": self.machine - earlier.machine,
        }


@dataclass(frozen=True)
class CpuProbe:
    """The processes a phase is charged to: the broker's and OpenBao's pids, this one."""

    broker_pid: int
    openbao_pid: int

    def sample(self) -> CpuSample:
        return CpuSample(
            broker=process_seconds(self.broker_pid),
            openbao=process_seconds(self.openbao_pid),
            postgres=postgres_seconds(),
            client=process_seconds(os.getpid()),
            machine=machine_seconds(),
        )


def pin(pid: int, cpus: set[int]) -> int:
    """Pin every thread of ``pid`` to ``cpus`` (threads started later inherit it from
    their creator); returns how many threads were pinned."""
    pinned = 0
    for task in (PROC / str(pid) / "task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
            pinned += 1
        except ProcessLookupError:
            continue  # the thread ended meanwhile
    return pinned


def cpu_model() -> str:
    text = _read(PROC / "cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load_average() -> str:
    return " ".join((_read(PROC / "loadavg") or "? ? ?").split()[:3])


def command_version(binary: str) -> str:
    """The first line a binary prints for ``version`` (OpenBao's), or why not."""
    try:
        out = subprocess.run(
            [binary, "version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({type(exc).__name__})"
    return (out.stdout.strip().splitlines() or ["unknown"])[0]
