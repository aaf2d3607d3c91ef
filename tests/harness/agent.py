"""Pods and agents for the agent's tests: a pod identity shaped like a Kubernetes projected
service-account token (signed by the dev issuer, which the broker is told is of kind
``kubernetes``: instance = ``kubernetes.io.pod.uid``, workload = ``namespace/sa``), and
``broker agent`` run as a real process, as the kubelet would run it."""

from __future__ import annotations

import asyncio
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp

from broker.dev.issuer import DevIssuer
from broker.dev.openbao import free_port
from tests.harness.ports import ATTEMPTS, port_taken
from tests.harness.wait import eventually

KUBERNETES_ISSUER = {
    "kind": "kubernetes",
    "instance_claim": ["kubernetes.io", "pod", "uid"],
    "workload_claim": {"join": [["kubernetes.io", "namespace"],
                                ["kubernetes.io", "serviceaccount", "name"]],
                       "separator": "/"},
}
DEV_ROLES = ("dev-cert", "dev-db")


def kubernetes_broker(extra_roles: dict[str, dict[str, Any]],
                      instance_policies: Iterable[str] = ()) -> dict[str, Any]:
    """``make_broker`` arguments: the dev issuer as a ``kubernetes`` issuer, and a policy
    that lets any ``namespace/serviceaccount`` have every dev role and ``extra_roles``."""
    allow = sorted({*DEV_ROLES, *extra_roles})
    policy = {"rules": [{"name": "pods", "issuer": "dev",
                         "match": [{"identity": "workload",
                                    "regex": "[a-z0-9-]{1,63}/[a-z0-9-]{1,63}"}],
                         "allow": allow}]}
    return {"issuer_overrides": KUBERNETES_ISSUER, "overrides": {"policy": policy},
            "extra_roles": extra_roles, "instance_policies": tuple(instance_policies)}


@dataclass
class Pod:
    """One pod: its uid (the broker's instance id), its credential directory and the
    file the kubelet keeps its projected token in."""

    issuer: DevIssuer
    root: Path
    namespace: str = "shop"
    service_account: str = "orders"
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.token_file.parent.mkdir(parents=True, exist_ok=True)
        self.write_token()

    @property
    def directory(self) -> Path:
        return self.root / f"pod-{self.uid[:8]}" / "credentials"

    @property
    def token_file(self) -> Path:
        return self.root / f"pod-{self.uid[:8]}" / "token" / "token"

    @property
    def workload(self) -> str:
        return f"{self.namespace}/{self.service_account}"

    def claims(self) -> dict[str, Any]:
        return {
            "kubernetes.io": {
                "namespace": self.namespace,
                "serviceaccount": {"name": self.service_account, "uid": str(uuid.uuid4())},
                "pod": {"name": f"{self.service_account}-{self.uid[:5]}", "uid": self.uid},
                "node": {"name": "node-1", "uid": str(uuid.uuid4())},
            },
            "sub": f"system:serviceaccount:{self.namespace}:{self.service_account}",
            "instance_id": None,  # not in a projected token
            "workload": None,
        }

    def token(self, ttl: int = 600, now: float | None = None) -> str:
        return self.issuer.mint(instance="", workload="", ttl=ttl, claims=self.claims(), now=now)

    def write_token(self, ttl: int = 600, now: float | None = None) -> None:
        """Replace the token file the way the kubelet does: write aside, then rename."""
        tmp = self.token_file.with_suffix(".new")
        tmp.write_text(self.token(ttl, now))
        os.replace(tmp, self.token_file)


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


_NAMED_APP = """
import ctypes, signal, sys
ctypes.CDLL("libc.so.6").prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME: its comm
def hup(*_):
    with open(sys.argv[2], "a") as f:
        f.write("hup\\n")
signal.signal(signal.SIGHUP, hup)
print("up", flush=True)
while True:
    signal.pause()
"""


def named_app(name: str, marker: Path) -> subprocess.Popen[bytes]:
    """An app whose ``/proc/PID/comm`` is ``name`` (at most 15 characters) and that
    appends ``hup`` to ``marker`` on each SIGHUP; it never forks, so exactly one process
    has the name. Returns once the handler is in place."""
    proc = subprocess.Popen([sys.executable, "-c", _NAMED_APP, name, str(marker)],
                            stdout=subprocess.PIPE, preexec_fn=_die_with_parent)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    return proc


def agent_args(pod: Pod, broker_url: str, credentials: Iterable[str],
               *extra: str) -> list[str]:
    args = [sys.executable, "-m", "broker.cli.main", "agent", "--broker-url", broker_url,
            "--token-file", str(pod.token_file), "--dir", str(pod.directory)]
    for c in credentials:
        args += ["--credential", c]
    return [*args, *extra]


class AgentProcess:
    """``broker agent`` running for a pod, its log in a file, its probe on a free port.
    ``kill_all`` ends every agent a test left running (a test that failed half-way)."""

    started: ClassVar[list[AgentProcess]] = []

    def __init__(self, args: Callable[[int], list[str]], log: Path) -> None:
        self._args = args  # the command line for a probe port
        self.log = log
        self.port = 0
        self.proc: asyncio.subprocess.Process
        self.started = 0.0  # time.monotonic() just before the process was started
        self._launches = 0
        self._logged = 0  # the log's size when the current process was started

    @classmethod
    async def start(cls, pod: Pod, broker_url: str, credentials: Iterable[str],
                    *extra: str) -> AgentProcess:
        def args(port: int) -> list[str]:
            return agent_args(pod, broker_url, credentials, "--ready-listen",
                              f"127.0.0.1:{port}", *extra)

        agent = cls(args, pod.root / f"agent-{pod.uid[:8]}-{secrets.token_hex(3)}.log")
        await agent._launch()
        cls.started.append(agent)
        return agent

    async def _launch(self) -> None:
        """Start the agent with its probe on a newly chosen port."""
        self.port = free_port()
        self._launches += 1
        self._logged = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.started = time.monotonic()
            self.proc = await asyncio.create_subprocess_exec(
                *self._args(self.port), stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=out, preexec_fn=_die_with_parent)

    def _lost_its_port(self) -> bool:
        """Whether the agent exited because another process bound its probe port between
        the choosing and the binding (it binds before it issues anything: a new start on
        another port changes nothing else)."""
        with open(self.log, "rb") as f:
            f.seek(self._logged)
            said = f.read().decode(errors="replace")
        return "--ready-listen" in said and port_taken(said) and self._launches < ATTEMPTS

    @classmethod
    async def kill_all(cls) -> None:
        while cls.started:
            await cls.started.pop().kill()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    async def probe(self, path: str = "/ready") -> tuple[int, dict[str, Any]] | None:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
                async with s.get(f"http://127.0.0.1:{self.port}{path}") as resp:
                    return resp.status, await resp.json()
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def wait_ready(self, timeout: float = 60.0) -> float:
        """Until GET /ready answers 200; the seconds since the process was started."""
        async def ready() -> bool:
            if self.proc.returncode is not None:
                if self._lost_its_port():
                    await self._launch()
                    return False
                raise AssertionError(f"agent exited ({self.proc.returncode}):\n{self.log_text()}")
            answer = await self.probe()
            return answer is not None and answer[0] == 200

        await eventually(ready, lambda: f"agent ready; log:\n{self.log_text()[-3000:]}",
                         timeout, 0.02)
        return time.monotonic() - self.started

    async def status(self) -> dict[str, Any]:
        answer = await self.probe()
        assert answer is not None, self.log_text()
        return answer[1]

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def run_once(pod: Pod, broker_url: str, credentials: Iterable[str], *extra: str,
                   timeout: float = 60.0) -> tuple[int, str]:
    """``broker agent --once``: its exit code and its output."""
    proc = await asyncio.create_subprocess_exec(
        *agent_args(pod, broker_url, credentials, "--once", *extra),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, preexec_fn=_die_with_parent)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")
