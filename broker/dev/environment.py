"""Assemble and run the dev environment: OpenBao + dev issuer + SQLite + the broker."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import socket
import textwrap
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from broker.app import Broker, assemble
from broker.config import Settings, load_settings
from broker.dev import write_private
from broker.dev.fresh import fresh_start_line, hold_directory, set_aside_previous_run
from broker.dev.issuer import DEV_AUDIENCE, DEV_MAX_TOKEN_LIFETIME_S, DevIssuer
from broker.dev.openbao import OpenBaoDevServer, free_port
from broker.leases.migrations import migrate
from broker.listen import ensure_free
from broker.vault.bootstrap import (
    AUDIT_KEY,
    OIDC_ROLE,
    OIDC_TTL,
    TRANSIT_MOUNT,
    OidcRole,
    bootstrap_dev,
)

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def dev_settings_dict(
    *,
    vault_addr: str,
    broker_token: str,
    issuer: str,
    jwks_uri: str,
    store_url: str,
    admin_token_sha256: str,
    with_database: bool,
    host: str = "127.0.0.1",
    port: int = 8300,
    checkpoint_file: Path | None = None,
    with_oidc: bool = False,
) -> dict[str, Any]:
    """The configuration `broker dev` runs with; the test harness uses it too. Audit
    checkpoints are signed by OpenBao transit (``bootstrap_dev`` creates the key) and,
    with ``checkpoint_file``, also appended there. ``with_oidc`` adds the ``dev-oidc``
    role (``bootstrap_dev`` creates its identity OIDC role), whose tokens need instance
    tokens with an identity entity: one per workload (``vault.entity_alias``)."""
    roles: dict[str, Any] = {
        "dev-cert": {
            "engine": "pki",
            "mount": "pki",
            "vault_role": "dev-cert",
            "default_ttl": "10m",
            "max_ttl": "1h",
            "params": {"common_name": "{workload}.workload.internal"},
        },
    }
    if with_database:
        roles["dev-db"] = {
            "engine": "database",
            "mount": "database",
            "vault_role": "dev-db",
            "default_ttl": "10m",
            "max_ttl": "1h",
        }
    if with_oidc:
        roles[OIDC_ROLE] = {
            "engine": "oidc",
            "mount": "identity",
            "vault_role": OIDC_ROLE,
            # The token lives as long as the OpenBao OIDC role says (5m); a JWT cannot
            # be recalled, so one living longer than max_ttl is refused.
            "default_ttl": OIDC_TTL,
            "max_ttl": OIDC_TTL,
        }
    return {
        "server": {"host": host, "port": port},
        "store": {"url": store_url},
        "vault": {
            "addr": vault_addr,
            "auth": {"method": "token", "token": broker_token},
            "token_role": "broker-instance",
            "instance_policies": ["broker-instance"],
            "instance_token_ttl": "24h",
            **({"entity_alias": "workload"} if with_oidc else {}),
        },
        "identity": {
            "audience": DEV_AUDIENCE,
            "issuers": [
                {
                    "name": "dev",
                    "issuer": issuer,
                    "jwks_uri": jwks_uri,
                    "algorithms": ["ES256"],
                    "instance_claim": "instance_id",
                    "workload_claim": "workload",
                    "leeway_s": 30,
                    "max_token_lifetime": DEV_MAX_TOKEN_LIFETIME_S,
                    # One dev token drives the whole walk-through; configured issuers
                    # default to jti_once (a token is good for one exchange).
                    "replay": "off",
                    "jwks_refresh_cooldown_s": 5,
                }
            ],
        },
        "roles": roles,
        "policy": {
            "rules": [
                {
                    "name": "dev-workloads",
                    "issuer": "dev",
                    "match": [{"identity": "workload", "regex": "[a-z0-9-]{1,63}"}],
                    "allow": sorted(roles),
                }
            ]
        },
        "admin": {"token_sha256": admin_token_sha256},
        "revocation": {"tick_s": 1.0},
        "audit": {
            "checkpoint": {
                "signer": "transit",
                "every": "10s",
                **({"file": str(checkpoint_file)} if checkpoint_file else {}),
            },
            "transit": {"mount": TRANSIT_MOUNT, "key": AUDIT_KEY},
        },
    }


def postgres_reachable(url: str, timeout: float = 2.0) -> str | None:
    """None if PostgreSQL answers at ``url``, else why not."""
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 5432), timeout=timeout
        ):
            pass
    except OSError as exc:
        return f"nothing listens at {parts.hostname}:{parts.port or 5432} ({exc.strerror})"
    try:
        import psycopg

        with psycopg.connect(
            url.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=int(timeout) or 1
        ):
            return None
    except Exception as exc:  # noqa: BLE001 — a reason for the user, no secret in it
        return f"cannot log in ({type(exc).__name__})"


@dataclass
class DevEnvironment:
    directory: Path
    port: int = 8300
    postgres_url: str | None = DEFAULT_POSTGRES_URL

    async def run(self, stop: asyncio.Event, *, ready: asyncio.Event | None = None) -> None:
        ensure_free("127.0.0.1", self.port)  # a port in use stops us before OpenBao starts
        d = self.directory.resolve()
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = hold_directory(d)
        bao = OpenBaoDevServer(d / "openbao")
        issuer_runner: web.AppRunner | None = None
        broker: Broker | None = None
        try:
            # A new OpenBao dev server knows nothing of a previous run: its store goes too,
            # and a dev.env a killed run left (the dead OpenBao's address and token).
            with suppress(FileNotFoundError):
                (d / "dev.env").unlink()
            moved = set_aside_previous_run(d, datetime.now(UTC))
            if moved is not None:
                print(fresh_start_line(shown(moved)), flush=True)
            await asyncio.to_thread(bao.start)
            issuer_port = free_port()
            issuer = DevIssuer.generate(f"http://127.0.0.1:{issuer_port}")
            issuer.save(d)
            issuer_runner = web.AppRunner(issuer.app(), access_log=None)
            await issuer_runner.setup()
            await web.TCPSite(issuer_runner, "127.0.0.1", issuer_port).start()

            db_problem = (
                await asyncio.to_thread(postgres_reachable, self.postgres_url)
                if self.postgres_url
                else "disabled with --no-postgres"
            )
            setup = await asyncio.to_thread(
                bootstrap_dev,
                bao.addr,
                bao.root_token,
                postgres_url=self.postgres_url if db_problem is None else None,
            )
            (d / "ca.pem").write_text(setup.ca_pem)

            admin_token = "adm-" + secrets.token_urlsafe(24)
            store_url = f"sqlite:///{d / 'broker.db'}"
            settings: Settings = load_settings(
                dev_settings_dict(
                    vault_addr=bao.addr,
                    broker_token=setup.broker_token,
                    issuer=issuer.issuer,
                    jwks_uri=f"{issuer.issuer}/.well-known/jwks.json",
                    store_url=store_url,
                    admin_token_sha256=hashlib.sha256(admin_token.encode()).hexdigest(),
                    with_database=setup.database_configured,
                    port=self.port,
                    checkpoint_file=d / "audit-checkpoints.jsonl",
                    with_oidc=True,
                ),
                source="dev",
            )
            await asyncio.to_thread(migrate, store_url)
            broker = Broker(assemble(settings, checks="direct"))
            await broker.start()
            write_private(
                d / "dev.env",
                textwrap.dedent(f"""\
                BROKER_URL={broker.url}
                BROKER_ADMIN_TOKEN={admin_token}
                VAULT_ADDR={bao.addr}
                VAULT_TOKEN={bao.root_token}
                """),
            )
            print(
                walkthrough(
                    d,
                    broker.url or "",
                    bao.addr,
                    setup.database_configured,
                    db_problem,
                    oidc=setup.oidc,
                ),
                flush=True,
            )
            if ready is not None:
                ready.set()
            await stop.wait()
        finally:
            if broker is not None:
                await broker.stop()
            if issuer_runner is not None:
                await issuer_runner.cleanup()
            await asyncio.to_thread(bao.stop)
            with suppress(FileNotFoundError):
                (d / "dev.env").unlink()
            os.close(lock)


def shown(path: Path) -> Path:
    """A path as the user typed it, relative to the working directory when inside it."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def walkthrough(
    d: Path,
    url: str,
    vault: str,
    with_db: bool,
    db_problem: str | None,
    *,
    oidc: OidcRole | None = None,
) -> str:
    where = shown(d)
    oidc_lines = (
        f"""
          dev-oidc : an OIDC token (JWT) for the instance's workload entity, signed by
                     OpenBao's identity engine: aud {oidc.client_id},
                     iss {oidc.issuer}; verify it with the JWKS at
                     {vault}/v1/identity/oidc/.well-known/keys
                     (a JWT cannot be recalled: it lives its {OIDC_TTL} whatever happens)"""
        if oidc is not None
        else ""
    )
    db = (
        "  dev-db  : a dynamic PostgreSQL login (OpenBao database engine)"
        if with_db
        else f"  dev-db  : not configured: PostgreSQL {db_problem}; pass --postgres-url URL"
    )
    return textwrap.dedent(f"""
        Broker dev environment is ready.
          broker   : {url}
          OpenBao  : {vault}   (root token in {where}/dev.env)
          store    : {where}/broker.db (SQLite; fresh on every start, like OpenBao dev)
          audit    : checkpoints signed by OpenBao transit (key {AUDIT_KEY}) every 10s,
                     also appended to {where}/audit-checkpoints.jsonl
        Roles:
          dev-cert : an X.509 workload certificate (OpenBao PKI)
        {db}{oidc_lines}

        Try it, in another shell:
          . .venv/bin/activate && set -a && . {where}/dev.env && set +a
          TOKEN=$(broker dev token --dir {where} --instance i-123 --workload payments)
          curl -s -H "Authorization: Bearer $TOKEN" -d '{{"role":"dev-cert"}}' \\
               $BROKER_URL/v1/credentials
          curl -s -H "Authorization: Bearer $TOKEN" -d '{{"role":"dev-oidc"}}' \\
               $BROKER_URL/v1/credentials      # data.token: a JWT, data.audience, ...
          brokerctl leases list --instance i-123
          brokerctl revoke --instance i-123 --wait
          brokerctl instances show i-123
          brokerctl reconcile          # the store against Vault: expiry, stuck, orphans
          brokerctl audit tail         # who did what; audit verify proves it unaltered

        Ctrl-C stops the broker, OpenBao and the issuer.
        """)
