"""podman for the image tests, with a store of its own (vfs, under the test's directory),
so no system-wide image store is read or written.

Two settings this machine needs, found by running the image here: the OCI runtime is runc,
because crun refuses the machine's hybrid cgroup hierarchy ("cgroups in hybrid mode not
supported, drop all controllers from cgroupv2"); and the containers' default limits are
set, because podman as root asks for nofile 1048576 and more processes than this machine
lets a process without CAP_SYS_RESOURCE (as here) set ("setrlimit RLIMIT_NOFILE: Operation
not permitted", and the same for RLIMIT_NPROC at the session's own limit): the session's
open-file limit, and 32,768 processes (what runc could set here)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from pathlib import Path

from tests.harness.services import service_missing

RUNTIME = "runc"


def require_tools() -> None:
    missing = [t for t in ("podman", "skopeo", RUNTIME, "gpg") if shutil.which(t) is None]
    if missing:
        service_missing(", ".join(missing), "install them (make image-tools does)")


class Podman:
    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
        limits = [f"nofile={nofile[0]}:{nofile[1]}", "nproc=32768:32768"]
        self.conf = home / "containers.conf"
        self.conf.write_text(f"[containers]\ndefault_ulimits = {json.dumps(limits)}\n")
        self.base = ["podman", "--root", str(home / "root"), "--runroot", str(home / "run"),
                     "--storage-driver", "vfs", "--runtime", RUNTIME]

    def run(self, *args: str, timeout: float = 300, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self.base, *args], capture_output=True, text=True,
                              timeout=timeout, check=False,
                              env={**os.environ, "CONTAINERS_CONF": str(self.conf), **(env or {})})
        if check:
            assert done.returncode == 0, f"podman {' '.join(args[:3])}: {done.stderr.strip()}"
        return done
