"""A real PostgreSQL for the tests: the one on 127.0.0.1:5432 if it answers (as on CI),
else a throwaway cluster started here with initdb/pg_ctl (a developer laptop)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg

from broker.dev.openbao import free_port
from tests.harness.wait import eventually_sync


@dataclass
class PgServer:
    admin_url: str  # a superuser, database "postgres"
    host: str
    port: int
    datadir: Path | None = None
    run_as: str | None = None

    def url(self, database: str, user: str = "postgres") -> str:
        return f"postgresql://{user}@{self.host}:{self.port}/{database}"

    def create_database(self, prefix: str = "broker_test") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def role_exists(self, name: str) -> bool:
        with psycopg.connect(self.admin_url) as conn:
            return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                                (name,)).fetchone() is not None

    def stop(self) -> None:
        if self.datadir is None:
            return
        cmd = [_pg_bin("pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop"]
        _run(cmd, self.run_as)
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not candidates:
        raise RuntimeError(f"{name} not found: install PostgreSQL server binaries")
    return candidates[-1]


def _run(cmd: list[str], user: str | None) -> None:
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=120)


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def find_or_start_postgres(workdir: Path) -> PgServer:
    env_url = os.environ.get("BROKER_TEST_PG_URL")
    if env_url:
        if not _answers(env_url):
            raise RuntimeError(f"BROKER_TEST_PG_URL does not answer: {env_url}")
        from urllib.parse import urlsplit
        parts = urlsplit(env_url)
        return PgServer(env_url, parts.hostname or "127.0.0.1", parts.port or 5432)
    local = "postgresql://postgres@127.0.0.1:5432/postgres"
    if _answers(local):
        return PgServer(local, "127.0.0.1", 5432)
    return start_throwaway(workdir)


def start_throwaway(workdir: Path) -> PgServer:
    """initdb + pg_ctl on a free loopback port. PostgreSQL refuses to run as root, so as
    root the cluster runs as the unprivileged 'postgres' user (or 'nobody')."""
    run_as = None
    if os.geteuid() == 0:
        import pwd
        for candidate in ("postgres", "nobody"):
            try:
                pwd.getpwnam(candidate)
                run_as = candidate
                break
            except KeyError:
                continue
    base = Path(workdir) / f"pg-{uuid.uuid4().hex[:8]}"
    base.mkdir(parents=True)
    datadir = base / "data"
    if run_as:
        shutil.chown(base, run_as)
    port = free_port()
    _run([_pg_bin("initdb"), "-D", str(datadir), "-U", "postgres", "-A", "trust",
          "--no-sync", "-E", "UTF8"], run_as)
    _run([_pg_bin("pg_ctl"), "-D", str(datadir), "-l", str(base / "log"), "-w", "-t", "60",
          "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
         run_as)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    eventually_sync(lambda: _answers(url), "throwaway PostgreSQL started")
    return PgServer(url, "127.0.0.1", port, datadir=datadir, run_as=run_as)
