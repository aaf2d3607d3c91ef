"""A real OpenBao on persistent storage (not ``-dev``), for fault tests that need Vault to
lose state the way production does: stopped, its storage copied, later restored from that
copy, started and unsealed again on the same address.

OpenBao 2 has no ``file`` storage backend any more ("unknown storage type file"): this is
integrated storage (``raft``), one node, whose data directory is copied and restored
while the server is stopped, as an operator restoring a backup of it would.

Initialised once with one key share (``bao operator init -key-shares=1
-key-threshold=1``, through ``sys/init``); the unseal key and root token stay in this
object, never in a file or a log.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import textwrap
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from broker.dev.openbao import bao_binary
from tests.harness.wait import eventually_sync

PR_SET_PDEATHSIG = 1
# Below Linux's ephemeral range (32768-60999): a port the kernel hands to bind(0) callers
# and outgoing connections could be taken while OpenBao is stopped between restarts.
PORTS = (20000, 30000)


def _quiet_port(taken: tuple[int, ...] = ()) -> int:
    """A port outside the ephemeral range that nothing holds now (checked by binding it):
    OpenBao restarts on the same one, so it must not be one bind(0) may give out."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(*PORTS)
        if port in taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError(f"no free port in {PORTS[0]}-{PORTS[1] - 1}")


def _die_with_parent() -> None:
    """Runs in the child before exec: an OpenBao outlives no test run, even one killed."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class PersistentOpenBao:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.storage = workdir / "storage"
        self.port = _quiet_port()
        self.cluster_port = _quiet_port((self.port,))
        self.addr = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "openbao.hcl"
        self.log = workdir / "openbao.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.root_token = ""
        self._unseal_key = ""

    def __repr__(self) -> str:  # the root token and unseal key stay out of failure output
        return f"PersistentOpenBao(addr={self.addr!r}, storage={str(self.storage)!r})"

    # -- the process ------------------------------------------------------------------

    def start(self) -> None:
        """Start the server on the storage as it is now; sealed until ``unseal``."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        self.config.write_text(textwrap.dedent(f"""\
            storage "raft" {{
              path    = "{self.storage}"
              node_id = "fault-test"
            }}
            listener "tcp" {{
              address         = "127.0.0.1:{self.port}"
              cluster_address = "127.0.0.1:{self.cluster_port}"
              tls_disable     = true
            }}
            api_addr     = "{self.addr}"
            cluster_addr = "http://127.0.0.1:{self.cluster_port}"
            ui           = false
            """))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.workdir)
        with open(self.log, "ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [bao_binary(), "server", f"-config={self.config}"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                preexec_fn=_die_with_parent)  # noqa: PLW1509 — no threads touch the child
        eventually_sync(lambda: self.health() is not None, self._why("OpenBao listening"), 60)

    def stop(self) -> None:
        """SIGTERM, and wait: the raft storage is complete once the process is gone."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    # -- init and unseal --------------------------------------------------------------

    def initialize(self) -> None:
        """One key share, threshold one; then unseal."""
        status, body = self._call("PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
        assert status == 200, (status, body)
        self._unseal_key = body["keys_base64"][0]
        self.root_token = body["root_token"]
        self.unseal()

    def unseal(self) -> None:
        assert self._unseal_key, "initialize first"
        status, body = self._call("PUT", "sys/unseal", {"key": self._unseal_key})
        assert status == 200, (status, body and body.get("errors"))
        eventually_sync(lambda: self.health() == 200, self._why("OpenBao unsealed and active"),
                        60)

    def health(self) -> int | None:
        """``sys/health``'s status: 200 active, 501 not initialised, 503 sealed; None when
        nothing answers."""
        try:
            with urllib.request.urlopen(f"{self.addr}/v1/sys/health", timeout=2) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError):
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"OpenBao exited ({self.proc.returncode})\n{self.tail()}") from None
            return None

    # -- the storage ------------------------------------------------------------------

    def copy_storage(self, name: str) -> Path:
        """A copy of the storage as it is now (stopped: complete and consistent)."""
        assert self.proc is None, "stop OpenBao before copying its storage"
        target = self.workdir / f"snapshot-{name}"
        shutil.copytree(self.storage, target)
        return target

    def restore_storage(self, copy: Path) -> None:
        """Replace the storage by an earlier copy: everything since is forgotten."""
        assert self.proc is None, "stop OpenBao before restoring its storage"
        shutil.rmtree(self.storage)
        shutil.copytree(copy, self.storage)

    # -- helpers ----------------------------------------------------------------------

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def _why(self, what: str) -> Any:
        return lambda: f"{what}\n{self.tail()}"

    def _call(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        req = urllib.request.Request(f"{self.addr}/v1/{path}", data=json.dumps(body).encode(),
                                     method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, json.loads(raw) if raw else None
