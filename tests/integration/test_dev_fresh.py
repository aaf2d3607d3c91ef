"""``broker dev`` killed and started again: the new OpenBao dev server knows nothing of the
old one's leases, so the old store does not come back with it. The previous run's store
is set aside (still readable), start-up says so in one line, and the new store is empty."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from pathlib import Path

import aiohttp
import psycopg

from tests.harness.postgres import PgServer
from tests.harness.wait import eventually
from tests.integration.test_cli import _bao_pids, run


async def start_dev(d: Path, pg: PgServer, after: str | None = None,
                    ) -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    """``broker dev`` on ``d``, once it wrote its dev.env (one with another OpenBao than
    ``after``, the address of a run killed before, whose dev.env it left)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli.main", "dev", "--dir", str(d), "--port", "0",
        "--postgres-url", pg.admin_url, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)

    def env_written() -> bool:
        assert proc.returncode is None, "broker dev exited"
        try:
            text = (d / "dev.env").read_text()
        except FileNotFoundError:
            return False
        return "VAULT_TOKEN=" in text and (after is None or f"VAULT_ADDR={after}\n" not in text)

    await eventually(env_written, "broker dev wrote dev.env", timeout=60)
    env = dict(line.split("=", 1) for line in (d / "dev.env").read_text().split())
    return proc, env


def lease_ids(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT lease_id FROM leases")}


async def test_a_restarted_dev_starts_its_store_fresh_with_its_fresh_openbao(
        tmp_path: Path, pg: PgServer) -> None:
    d = tmp_path / "dev"
    first, env = await start_dev(d, pg)
    username = None
    try:
        code, token, _ = await run("broker.cli.main", "dev", "token", "--dir", str(d),
                                   "--instance", "i-fresh", "--workload", "payments")
        assert code == 0
        async with aiohttp.ClientSession() as http, http.post(
                f"{env['BROKER_URL']}/v1/credentials", json={"role": "dev-db"},
                headers={"Authorization": f"Bearer {token.strip()}"}) as r:
            assert r.status == 201, await r.text()
            cred = await r.json()
        username = cred["data"]["username"]
        assert lease_ids(d / "broker.db") == {cred["lease_id"]}
        old_vault = env["VAULT_ADDR"]
        had_checkpoints = (d / "audit-checkpoints.jsonl").exists()
        first.send_signal(signal.SIGKILL)  # no shutdown hook: the store stays as it was
        await asyncio.wait_for(first.wait(), 30)
        await eventually(lambda: _bao_pids(old_vault) == [], "the old OpenBao stopped",
                         timeout=30)

        second, env = await start_dev(d, pg, after=old_vault)
        try:
            assert second.stdout is not None
            first_line = (await asyncio.wait_for(second.stdout.readline(), 10)).decode()
            assert first_line.startswith("broker dev: starting fresh"), first_line
            previous = sorted((d / "previous").iterdir())
            assert len(previous) == 1
            assert first_line.rstrip().endswith(f"{previous[0]}/")
            # the old lease is not in the new store; the set-aside store still has it
            assert lease_ids(d / "broker.db") == set()
            assert lease_ids(previous[0] / "broker.db") == {cred["lease_id"]}
            # checkpoints signed by the dead OpenBao's transit key went with their store
            assert (previous[0] / "audit-checkpoints.jsonl").exists() == had_checkpoints
            # a second `broker dev` on the same directory is refused while this one runs
            code, _, err = await run("broker.cli.main", "dev", "--dir", str(d), "--port", "0",
                                     "--no-postgres")
            assert code == 2 and "another `broker dev` is running" in err
            assert second.returncode is None
        finally:
            second.send_signal(signal.SIGINT)
            await asyncio.wait_for(second.wait(), 30)
        assert second.returncode == 0
    finally:
        if first.returncode is None:
            first.send_signal(signal.SIGKILL)
            await first.wait()
        if username is not None:  # the lost OpenBao can no longer revoke it
            with psycopg.connect(pg.admin_url, autocommit=True) as conn:
                conn.execute(f'DROP ROLE IF EXISTS "{username}"')
