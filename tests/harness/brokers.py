"""Broker processes for fault tests: ``broker serve --config`` started, waited for,
killed with SIGKILL and restarted on the same configuration.

The broker's Vault token reaches the process through the environment
(``TEST_BROKER_VAULT_TOKEN``, referenced from the YAML as ``${TEST_BROKER_VAULT_TOKEN}``),
so it is never written to the configuration file or a log.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from broker.dev.openbao import free_port
from broker.secret import Secret
from tests.harness.ports import ATTEMPTS, port_taken
from tests.harness.wait import eventually

PR_SET_PDEATHSIG = 1
TOKEN_ENV = "TEST_BROKER_VAULT_TOKEN"
TOKEN_REF = "${" + TOKEN_ENV + "}"
# How long a broker process may take to answer ready: it imports, reaches the store and
# Vault first. A bound only (the wait ends as soon as it is ready): on two cores shared
# with other test runs and a CPU hog, starts took more than 30 s.
START_S = 120.0


def _die_with_parent() -> None:
    """Runs in the child before exec: a broker outlives no test run, even one killed."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def serve(config: Path, log: Path, vault_token: Secret) -> subprocess.Popen[bytes]:
    """Start ``broker serve`` on ``config``; its output goes to ``log`` (appended)."""
    env = {**os.environ, TOKEN_ENV: vault_token.reveal()}
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "broker.cli.main", "serve", "--config", str(config)],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent)  # noqa: PLW1509 — no threads touch the child


def log_tail(log: Path, lines: int = 15) -> str:
    """The end of a broker's log (the broker logs no token or credential value)."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _log_size(log: Path) -> int:
    try:
        return log.stat().st_size
    except FileNotFoundError:
        return 0


def _exited_on_taken_port(proc: subprocess.Popen[bytes], log: Path, offset: int) -> bool:
    """Whether ``proc`` ended because its port was taken (what it logged past ``offset``)."""
    if proc.poll() is None:
        return False
    with open(log, "rb") as f:
        f.seek(offset)
        return port_taken(f.read().decode(errors="replace"))


async def serve_on_free_port(config_for: Callable[[int], Path], log: Path,
                             vault_token: Secret) -> tuple[subprocess.Popen[bytes], str]:
    """``broker serve`` on the configuration ``config_for(port)`` writes for a free port,
    ready: the process and its URL. A port chosen here is only free when chosen: a broker
    that exits because another process bound it first is started again on a new one."""
    for attempt in range(1, ATTEMPTS + 1):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        logged = _log_size(log)
        proc = serve(config_for(port), log, vault_token)
        try:
            await wait_ready(url, proc, log=log)
            return proc, url
        except AssertionError:
            if attempt == ATTEMPTS or not _exited_on_taken_port(proc, log, logged):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
                raise
    raise AssertionError("unreachable")


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = START_S,
                     log: Path | None = None) -> None:
    """Until ``/readyz`` answers 200 (store and Vault reachable); fails if the process
    exits first or the bound passes."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:

        async def ready() -> bool:
            if proc.poll() is not None:
                tail = log_tail(log) if log else ""
                raise AssertionError(f"broker exited during start-up ({proc.returncode})\n{tail}")
            try:
                async with s.get(f"{url}/readyz") as resp:
                    return resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        await eventually(ready, f"broker at {url} ready", timeout, 0.1)


class BrokerProcess:
    """One broker replica: a configuration file on a fixed port, and the process serving
    it now (replaced on every restart)."""

    def __init__(self, config: Path, log: Path, vault_token: Secret, port: int) -> None:
        self.config = config
        self.log = log
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._vault_token = vault_token
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []  # every process that served it, in order

    @classmethod
    def configure(cls, directory: Path, name: str, data: dict[str, Any],
                  vault_token: Secret) -> BrokerProcess:
        """Write ``data`` (``dev_settings_dict`` output; its server port is replaced by a
        free one and its Vault token by the environment reference) as ``name``.yaml."""
        port = free_port()
        data = {**data, "server": {**data["server"], "port": port},
                "vault": {**data["vault"], "auth": {"method": "token", "token": TOKEN_REF}}}
        config = directory / f"{name}.yaml"
        config.write_text(yaml.safe_dump(data))
        return cls(config, directory / f"{name}.log", vault_token, port)

    async def start(self, timeout: float = START_S) -> None:
        """Start (or restart) the broker and wait until it is ready. On its first start,
        a broker that exits because another process took its port in the meantime is
        moved to a new port (``url`` changes: read it after ``start``); a restart keeps
        the port it served on."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        first = not self.pids
        for attempt in range(1, ATTEMPTS + 1):
            logged = _log_size(self.log)
            self.proc = serve(self.config, self.log, self._vault_token)
            self.pids.append(self.proc.pid)
            try:
                await wait_ready(self.url, self.proc, timeout, self.log)
                return
            except AssertionError:
                if (not first or attempt == ATTEMPTS
                        or not _exited_on_taken_port(self.proc, self.log, logged)):
                    raise
            self._move(free_port())

    def _move(self, port: int) -> None:
        data = yaml.safe_load(self.config.read_text())
        data["server"]["port"] = port
        self.config.write_text(yaml.safe_dump(data))
        self.port, self.url = port, f"http://127.0.0.1:{port}"

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, in-flight work stops wherever it is."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
