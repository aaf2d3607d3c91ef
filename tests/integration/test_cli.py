"""The command lines as users run them: ``broker`` and ``brokerctl`` in subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp
import jwt
import psycopg
import pytest
import yaml

from broker.dev.environment import dev_settings_dict
from tests.conftest import ADMIN_SHA, ADMIN_TOKEN
from tests.harness.wait import eventually


async def run(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None,
              timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    return proc.returncode, out.decode(), err.decode()


def ctl_env(url: str, token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"BROKER_URL": url, "BROKER_ADMIN_TOKEN": token}


async def test_brokerctl_lists_shows_and_revokes(broker, http, pg):
    token = broker.token("i-ctl")
    async with http.post(f"{broker.url}/v1/credentials", json={"role": "dev-db"},
                         headers={"Authorization": f"Bearer {token}"}) as resp:
        cred = await resp.json()
    env = ctl_env(broker.url)

    code, out, _ = await run("broker.cli.ctl", "leases", "list", "--instance", "i-ctl", env=env)
    assert code == 0
    header, row = out.strip().splitlines()
    assert header.split() == ["LEASE_ID", "INSTANCE_ID", "WORKLOAD", "ROLE", "KIND", "STATE",
                              "EXPIRES_AT"]
    assert row.split()[:6] == [cred["lease_id"], "i-ctl", "payments", "dev-db",
                               "database_login", "active"]

    code, out, _ = await run("broker.cli.ctl", "-o", "json", "leases", "list", "--role",
                             "dev-db", "--state", "active", env=env)
    assert code == 0
    assert json.loads(out) == {"leases": [json.loads(out)["leases"][0]], "next": None}
    assert [x["lease_id"] for x in json.loads(out)["leases"]] == [cred["lease_id"]]
    # -o anywhere, as kubectl and vault users expect: after the subcommand too.
    code, after, err = await run("broker.cli.ctl", "leases", "list", "--role", "dev-db",
                                 "-o", "json", env=env)
    assert (code, err, json.loads(after)) == (0, "", json.loads(out))
    code, line, _ = await run("broker.cli.ctl", "leases", "list", "--instance", "i-ctl",
                              "--output", "jsonl", env=env)
    assert [json.loads(x)["lease_id"] for x in line.splitlines()] == [cred["lease_id"]]

    code, out, _ = await run("broker.cli.ctl", "revoke", "--instance", "i-ctl", "--wait",
                             env=env)
    assert code == 0, out
    assert out.startswith("instance i-ctl: revocation job j-") and "is done" in out
    assert not pg.role_exists(cred["data"]["username"])

    code, out, _ = await run("broker.cli.ctl", "-o", "json", "instances", "show", "i-ctl",
                             env=env)
    shown = json.loads(out)
    assert (shown["state"], shown["job"]["state"], [x["state"] for x in shown["leases"]]) == (
        "terminated", "done", ["revoked"])

    code, out, _ = await run("broker.cli.ctl", "jobs", "list", "--state", "done", env=env)
    assert code == 0 and "i-ctl" in out


@pytest.mark.parametrize("args,env_over,exit_code,message", [
    (["instances", "show", "i-nope"], {}, 3, "no such instance (instance_not_found)"),
    (["leases", "list"], {"BROKER_ADMIN_TOKEN": "wrong"}, 4, "BROKER_ADMIN_TOKEN"),
    (["leases", "list"], {"BROKER_URL": "http://127.0.0.1:9"}, 5, "cannot reach the broker"),
    (["leases", "list", "--state", "nonsense"], {}, 2, "invalid choice: 'nonsense'"),
    (["jobs", "list", "--state", "nonsense"], {}, 2, "invalid choice: 'nonsense'"),
    (["jobs", "list", "--after", "garbage"], {}, 1, "invalid_query"),
    (["instances", "show", "bad id"], {}, 1, "invalid_instance_id"),
], ids=["not_found", "wrong_admin_token", "unreachable", "bad_lease_state", "bad_job_state",
        "bad_cursor", "bad_instance_id"])
async def test_brokerctl_exit_codes_mean_something(broker, args, env_over, exit_code, message):
    env = {**ctl_env(broker.url), **env_over}
    code, out, err = await run("broker.cli.ctl", *args, env=env)
    assert code == exit_code, (out, err)
    assert message in err


async def test_brokerctl_without_url_says_what_to_set():
    code, _, err = await run("broker.cli.ctl", "leases", "list",
                             env={"BROKER_URL": "", "BROKER_ADMIN_TOKEN": ""})
    assert code == 2 and "set BROKER_URL or pass --url" in err


async def test_serve_refuses_a_bad_config_naming_the_key(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    data = dev_settings_dict(vault_addr="http://127.0.0.1:1/v1", broker_token="t",
                             issuer="https://i", jwks_uri="https://i/jwks", store_url="sqlite:///x",
                             admin_token_sha256=ADMIN_SHA, with_database=False)
    data["identity"]["issuers"][0]["algorithms"] = ["HS256"]
    bad.write_text(yaml.safe_dump(data))
    code, _, err = await run("broker.cli.main", "serve", "--config", str(bad))
    assert code == 2
    assert "vault.addr: Value error, expected http(s)://host:port with no path" in err or \
        "vault.addr: expected http(s)://host:port with no path" in err
    assert "identity.issuers.0.algorithms:" in err and "HS256" in err

    missing_env = tmp_path / "env.yaml"
    data = dev_settings_dict(vault_addr="http://127.0.0.1:1", broker_token="${NOT_SET_ANYWHERE}",
                             issuer="https://i", jwks_uri="https://i/jwks", store_url="sqlite:///x",
                             admin_token_sha256=ADMIN_SHA, with_database=False)
    missing_env.write_text(yaml.safe_dump(data))
    code, _, err = await run("broker.cli.main", "serve", "--config", str(missing_env))
    assert code == 2 and "vault.auth.token: environment variable NOT_SET_ANYWHERE is not set" in err


async def test_serve_refuses_an_unmigrated_store(tmp_path: Path, bao, vault_setup, issuer):
    cfg = tmp_path / "broker.yaml"
    cfg.write_text(yaml.safe_dump(dev_settings_dict(
        vault_addr=bao.addr, broker_token=vault_setup.broker_token, issuer=issuer.issuer,
        jwks_uri=f"{issuer.issuer}/.well-known/jwks.json",
        store_url=f"sqlite:///{tmp_path / 'fresh.db'}", admin_token_sha256=ADMIN_SHA,
        with_database=False, port=0)))
    code, _, err = await run("broker.cli.main", "serve", "--config", str(cfg))
    assert code == 2 and "not migrated" in err and "broker migrate" in err
    code, out, _ = await run("broker.cli.main", "migrate", "--config", str(cfg))
    assert code == 0 and "migrated" in out


async def test_dev_token_signs_with_the_dev_issuer(tmp_path: Path, issuer):
    issuer.save(tmp_path)
    code, out, _ = await run("broker.cli.main", "dev", "token", "--dir", str(tmp_path),
                             "--instance", "i-9", "--workload", "billing", "--claim", "team=x",
                             "--ttl", "2m")
    assert code == 0
    claims = jwt.decode(out.strip(), issuer.key.public_key(), algorithms=["ES256"],
                        audience=issuer.audience)
    assert (claims["instance_id"], claims["workload"], claims["team"]) == ("i-9", "billing", "x")
    assert claims["exp"] - claims["iat"] == 120
    code, _, err = await run("broker.cli.main", "dev", "token", "--dir", str(tmp_path / "no"),
                             "--instance", "i", "--workload", "w")
    assert code == 2 and "start `broker dev` first" in err


async def test_broker_dev_runs_everything_and_ctrl_c_leaves_nothing(tmp_path: Path, pg):
    d = tmp_path / "dev"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli.main", "dev", "--dir", str(d), "--port", "0",
        "--postgres-url", pg.admin_url, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:

        def env_written() -> bool:
            assert proc.returncode is None, "broker dev exited"
            return (d / "dev.env").exists()

        await eventually(env_written, "broker dev wrote dev.env", timeout=60)
        env = dict(line.split("=", 1) for line in (d / "dev.env").read_text().split())
        assert set(env) == {"BROKER_URL", "BROKER_ADMIN_TOKEN", "VAULT_ADDR", "VAULT_TOKEN"}
        assert oct((d / "dev.env").stat().st_mode & 0o777) == "0o600"
        code, token, _ = await run("broker.cli.main", "dev", "token", "--dir", str(d),
                                   "--instance", "i-123", "--workload", "payments")
        async with aiohttp.ClientSession() as http:
            for role in ("dev-cert", "dev-db"):
                async with http.post(f"{env['BROKER_URL']}/v1/credentials", json={"role": role},
                                     headers={"Authorization": f"Bearer {token.strip()}"}) as r:
                    assert r.status == 201, await r.text()
                    cred = await r.json()
        with psycopg.connect(pg.url("postgres", user=cred["data"]["username"]),
                             password=cred["data"]["password"]) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        code, out, _ = await run("broker.cli.ctl", "revoke", "--instance", "i-123", "--wait",
                                 env=env)
        assert code == 0 and "is done" in out
        assert not pg.role_exists(cred["data"]["username"])
        bao_pids = _bao_pids(env["VAULT_ADDR"])
        assert bao_pids
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0
    # OpenBao goes with it (the bound is the harness's: a busy machine may take a while to
    # reap it, and a leftover OpenBao would still fail the test).
    await eventually(lambda: _bao_pids(env["VAULT_ADDR"]) == [], "OpenBao stopped")
    assert not (d / "dev.env").exists()


def _bao_pids(addr: str) -> list[int]:
    port = addr.rsplit(":", 1)[1]
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "bao" in cmd and f"127.0.0.1:{port}" in cmd:
                pids.append(int(p.name))
    return pids
