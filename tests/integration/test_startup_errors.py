"""What ``broker serve``, ``broker dev``, ``broker injector`` and ``broker migrate`` say
when they cannot start: one line on stderr that names the address or the store and says
whether retrying can help, a non-zero exit, no traceback, no warning, and never the store
URL's password. Subprocesses, as an operator runs them."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import yaml

from broker.dev.environment import dev_settings_dict
from tests.conftest import ADMIN_SHA

PASSWORD = "pw-must-not-show-7f3a"


async def run(*args: str, timeout: float = 120) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "VAULT_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-W", "always", "-m", "broker.cli.main", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_line(err: str) -> str:
    """The whole of stderr: exactly one line, from the broker, nothing else."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("broker: "), err
    assert "Traceback" not in err and "Warning" not in err and PASSWORD not in err
    return lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port bound but not listened on: a connection to it is refused, and no other
    process can take it meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def config(tmp_path: Path, *, store_url: str, port: int = 0) -> Path:
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(dev_settings_dict(
        vault_addr="http://127.0.0.1:1", broker_token="t", issuer="https://i",
        jwks_uri="https://i/jwks", store_url=store_url, admin_token_sha256=ADMIN_SHA,
        with_database=False, port=port)))
    return path


async def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path: Path, taken_port: int):
    cfg = config(tmp_path, store_url=f"sqlite:///{tmp_path / 'b.db'}", port=taken_port)
    code, out, err = await run("serve", "--config", str(cfg))
    assert code == 1 and out == ""
    assert one_line(err).startswith(f"broker: address 127.0.0.1:{taken_port} is already in use")
    # Refused before the store was opened.
    assert not (tmp_path / "b.db").exists()


async def test_dev_on_a_port_in_use_stops_before_openbao_starts(tmp_path: Path,
                                                                taken_port: int):
    d = tmp_path / "dev"
    code, out, err = await run("dev", "--dir", str(d), "--port", str(taken_port),
                               "--no-postgres")
    assert code == 1 and out == ""
    assert one_line(err).startswith(f"broker: address 127.0.0.1:{taken_port} is already in use")
    assert not d.exists()  # no OpenBao, no issuer, no store


async def test_injector_on_a_port_in_use_says_so_in_one_line(taken_port: int):
    code, _, err = await run("injector", "--insecure-http", "--listen",
                             f"127.0.0.1:{taken_port}", "--broker-url", "http://127.0.0.1:1")
    assert code == 1
    assert one_line(err).startswith(f"broker: address 127.0.0.1:{taken_port} is already in use")


def store_cases(pg, refusing_port: int, tmp_path: Path) -> list[tuple[str, str, int, str]]:
    """(store URL, the place named, exit code, what the line ends with)."""
    host_port = pg.admin_url.split("@", 1)[1].split("/", 1)[0]
    return [
        (f"postgresql://postgres:{PASSWORD}@127.0.0.1:{refusing_port}/leases",
         f'PostgreSQL database "leases" on 127.0.0.1:{refusing_port} as user postgres', 1,
         "connection refused, nothing listens there; retrying can help once it is up"),
        (f"postgresql://postgres:{PASSWORD}@{host_port}/no_such_db_c1",
         f'PostgreSQL database "no_such_db_c1" on {host_port} as user postgres', 2,
         "the database does not exist; retrying will not help: create it, or correct "
         "store.url"),
        (f"postgresql://no_such_role_c1:{PASSWORD}@{host_port}/postgres",
         f'PostgreSQL database "postgres" on {host_port} as user no_such_role_c1', 2,
         "the server refused the login; retrying will not help: check the user and "
         "pg_hba.conf"),
        (f"postgresql://postgres:{PASSWORD}@no-such-host.invalid:5432/leases",
         'PostgreSQL database "leases" on no-such-host.invalid:5432 as user postgres', 2,
         "the host name does not resolve; retrying will not help: correct the host in "
         "store.url"),
        (f"sqlite:///{tmp_path / 'missing' / 'dir' / 'b.db'}",
         f"SQLite file {tmp_path / 'missing' / 'dir' / 'b.db'}", 2,
         "the file cannot be opened; retrying will not help: check that its directory "
         "exists and is writable"),
    ]


async def test_migrate_and_serve_name_the_store_and_say_whether_to_retry(
        tmp_path: Path, pg, refusing_port: int):
    for i, (url, place, exit_code, ending) in enumerate(
            store_cases(pg, refusing_port, tmp_path)):
        cfg = config(tmp_path, store_url=url)
        runs = [["migrate", "--store-url", url], ["serve", "--config", str(cfg)]]
        if i == 0:  # the same path as --store-url once the file is loaded
            runs.append(["migrate", "--config", str(cfg)])
        for args in runs:
            code, _, err = await run(*args)
            line = one_line(err)
            assert (code, line) == (
                exit_code, f"broker: cannot reach the lease store, {place}: {ending}"), args


async def test_an_unsupported_store_scheme_is_refused_before_connecting(tmp_path: Path):
    url = f"mysql://broker:{PASSWORD}@127.0.0.1:1/leases"
    code, _, err = await run("migrate", "--store-url", url)
    assert code == 2 and one_line(err) == (
        "broker: --store-url: unsupported scheme 'mysql': the lease store is SQLite or "
        "PostgreSQL (sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE)")
    cfg = config(tmp_path, store_url=url)
    for command in ("migrate", "serve"):
        code, _, err = await run(command, "--config", str(cfg))
        assert code == 2 and "store.url: unsupported scheme 'mysql'" in err
        assert "Traceback" not in err and PASSWORD not in err


async def test_dev_token_takes_dir_before_or_after_token_and_a_ttl_in_range(
        tmp_path: Path, issuer):
    issuer.save(tmp_path)
    for args in (["dev", "--dir", str(tmp_path), "token"],
                 ["dev", "token", "--dir", str(tmp_path)],
                 ["dev", "--dir", str(tmp_path / "other"), "token", "--dir", str(tmp_path)]):
        code, out, err = await run(*args, "--instance", "i-1", "--workload", "w", "--ttl", "1h")
        assert code == 0, err
        claims = jwt.decode(out.strip(), issuer.key.public_key(), algorithms=["ES256"],
                            audience=issuer.audience)
        assert claims["exp"] - claims["iat"] == 3600
    for ttl in ("0", "61m", "2h"):
        code, out, err = await run("dev", "token", "--dir", str(tmp_path), "--instance", "i-1",
                                   "--workload", "w", "--ttl", ttl)
        assert (code, out) == (2, "")
        assert one_line(err) == (f"broker: --ttl: {ttl!r} is out of range: the dev broker "
                                 "accepts tokens valid for 1s to 1h")
