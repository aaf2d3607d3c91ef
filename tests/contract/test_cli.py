"""The command lines' surface: every ``--help`` of ``broker`` and ``brokerctl`` (argparse
output at a fixed width), and what ``brokerctl`` prints and exits with when it cannot do
what it was asked."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys

from tests.conftest import ADMIN_TOKEN
from tests.contract.golden import assert_golden

BROKER_HELP = [[], ["serve"], ["migrate"], ["dev"], ["dev", "token"], ["hash-admin-token"],
               ["agent"], ["injector"]]
BROKERCTL_HELP = [[], ["revoke"], ["leases"], ["leases", "list"], ["leases", "count"],
                  ["leases", "show"], ["leases", "resolve"], ["instances"], ["instances", "list"],
                  ["instances", "show"], ["policy"], ["policy", "explain"], ["jobs"],
                  ["jobs", "list"], ["jobs", "retry"], ["reconcile"], ["whoami"], ["lock"],
                  ["lock", "create"], ["lock", "list"], ["lock", "rm"], ["audit"],
                  ["audit", "verify"], ["audit", "list"], ["audit", "tail"],
                  ["audit", "export"]]


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without the caller's broker settings, at a fixed width."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return {**env, "COLUMNS": "100", "LINES": "50", **extra}


async def run(module: str, *args: str, env: dict[str, str] | None = None,
              timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env or clean_env())
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def transcript(program: str, args: list[str], code: int, out: str, err: str,
               env: dict[str, str] | None = None) -> str:
    assignments = [f"{k}={v}" for k, v in (env or {}).items()]
    lines = [f"$ {shlex.join([*assignments, program, *args])}"]
    if out:
        lines.append(out.rstrip("\n"))
    if err:
        lines += ["[stderr]", err.rstrip("\n")]
    lines.append(f"[exit {code}]")
    return "\n".join(lines) + "\n"


async def helps(module: str, program: str, commands: list[list[str]]) -> str:
    runs = await asyncio.gather(*(run(module, *c, "--help") for c in commands))
    return "\n".join(transcript(program, [*c, "--help"], *r)
                     for c, r in zip(commands, runs, strict=True))


async def test_broker_help_is_unchanged():
    assert_golden("cli_broker_help.txt", await helps("broker.cli.main", "broker", BROKER_HELP))


async def test_brokerctl_help_is_unchanged():
    assert_golden("cli_brokerctl_help.txt",
                  await helps("broker.cli.ctl", "brokerctl", BROKERCTL_HELP))


async def test_usage_errors_exit_2():
    cases = [("broker.cli.main", "broker", []), ("broker.cli.main", "broker", ["serve"]),
             ("broker.cli.main", "broker", ["migrate"]),
             ("broker.cli.ctl", "brokerctl", []), ("broker.cli.ctl", "brokerctl", ["leases"]),
             ("broker.cli.ctl", "brokerctl", ["--bogus", "leases", "list"]),
             ("broker.cli.ctl", "brokerctl", ["jobs", "list", "--state", "nonsense"]),
             ("broker.cli.ctl", "brokerctl", ["leases", "list"]),
             ("broker.cli.ctl", "brokerctl", ["leases", "list", "--state", "nonsense"]),
             ("broker.cli.ctl", "brokerctl", ["leases", "list", "--limit", "0"]),
             ("broker.cli.ctl", "brokerctl", ["leases", "count"]),
             ("broker.cli.ctl", "brokerctl", ["leases", "resolve", "l-" + "0" * 32]),
             ("broker.cli.ctl", "brokerctl", ["instances", "list", "--since", "yesterday"])]
    env = clean_env()
    runs = await asyncio.gather(*(run(m, *a, env=env) for m, _, a in cases))
    assert all(code == 2 for code, _, _ in runs), runs
    assert_golden("cli_usage_errors.txt", "\n".join(
        transcript(p, a, *r) for (_, p, a), r in zip(cases, runs, strict=True)))


async def test_brokerctl_exit_codes_against_a_broker(broker):
    """Not found 3, not authorized 4, unreachable 5, refused 1, bad URL 2: the code and
    the line printed, with the broker's address masked."""
    cases = [
        (["instances", "show", "i-nope"], {}),
        (["jobs", "retry", "j-" + "0" * 32], {}),
        (["leases", "list"], {"BROKER_ADMIN_TOKEN": "wrong"}),
        (["leases", "list"], {"BROKER_URL": "http://127.0.0.1:9"}),
        (["leases", "list", "--after", "!"], {}),
        (["jobs", "list", "--after", "!"], {}),
        (["instances", "show", "bad id"], {}),
        (["leases", "list"], {"BROKER_URL": "ftp://broker"}),
        (["-o", "json", "leases", "list"], {}),
        (["jobs", "list"], {}),
        (["leases", "list", "-o", "json"], {}),
        (["leases", "count", "--group-by", "role"], {}),
        (["leases", "show", "l-" + "0" * 32, "--vault"], {}),
        (["leases", "resolve", "l-" + "0" * 32, "--reason", "ended by hand"], {}),
    ]
    base = {"BROKER_URL": broker.url, "BROKER_ADMIN_TOKEN": ADMIN_TOKEN}
    runs = [await run("broker.cli.ctl", *args, env=clean_env(**{**base, **over}))
            for args, over in cases]
    codes = [code for code, _, _ in runs]
    assert codes == [3, 3, 4, 5, 1, 1, 1, 2, 0, 0, 0, 0, 3, 3], runs
    text = "\n".join(
        transcript("brokerctl", args, *r, env=over)
        for (args, over), r in zip(cases, runs, strict=True))
    assert_golden("cli_brokerctl_exit_codes.txt", text.replace(broker.url, "<broker-url>"))
