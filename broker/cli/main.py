"""``broker``: serve, migrate, dev, dev token, hash-admin-token, agent, injector.

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from broker.agent.options import add_arguments as add_agent_arguments
from broker.errors import BrokerError, ConfigError, StartupFailure

DEFAULT_DEV_DIR = Path(".broker-dev")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="broker", description="Ephemeral credential broker")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the broker against a configured Vault and store")
    s.add_argument("--config", required=True, type=Path, help="YAML configuration file")

    m = sub.add_parser("migrate", help="apply the lease store's schema migrations")
    g = m.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", type=Path, help="YAML configuration file (uses store.url)")
    g.add_argument("--store-url", help="sqlite:///PATH or postgresql://…")

    d = sub.add_parser("dev", help="run everything locally: OpenBao dev, SQLite, dev issuer")
    d.add_argument("--dir", type=Path, default=DEFAULT_DEV_DIR, help="state directory")
    d.add_argument("--port", type=int, default=8300, help="broker port (0: any free port)")
    d.add_argument(
        "--postgres-url",
        default=None,
        help="PostgreSQL for the dev-db role (default: postgres@127.0.0.1:5432)",
    )
    d.add_argument("--no-postgres", action="store_true", help="do not configure dev-db")
    d.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="warning",
        help="the broker's log level (default: warning; info shows every request's outcome)",
    )
    dsub = d.add_subparsers(dest="dev_command")
    t = dsub.add_parser("token", help="print an identity token signed by the dev issuer")
    # Also given before ``token`` (``broker dev --dir D token``): the nearer one wins.
    t.add_argument("--dir", type=Path, default=None, dest="token_dir")
    t.add_argument("--instance", required=True)
    t.add_argument("--workload", required=True)
    t.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra claim (repeatable)",
    )
    t.add_argument("--ttl", default="5m", help="token lifetime, e.g. 5m")

    h = sub.add_parser(
        "hash-admin-token",
        help="read an admin token on stdin, print the SHA-256 for admin.token_sha256",
    )
    h.set_defaults()

    a = sub.add_parser("agent", help="keep a pod's credentials as files (the injected sidecar)")
    add_agent_arguments(a)
    j = sub.add_parser(
        "injector", help="run the Kubernetes admission webhook that adds the credential agent"
    )
    j.add_argument(
        "--config", type=Path, help="YAML configuration file (without one: the defaults)"
    )
    j.add_argument("--listen", metavar="HOST:PORT", help="where to serve (overrides listen)")
    j.add_argument(
        "--insecure-http",
        action="store_true",
        help="serve plain HTTP; only on a loopback address (tests, development)",
    )
    j.add_argument(
        "--broker-url", metavar="URL", help="the broker the agents call (overrides broker_url)"
    )
    return p


def _run_until_signal(coro_fn: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await coro_fn(stop)

    asyncio.run(main())


def cmd_serve(args: argparse.Namespace) -> int:
    from broker.app import Broker, assemble
    from broker.config import load_settings_file
    from broker.logs import configure_logging

    settings = load_settings_file(args.config)
    configure_logging(settings.log_level)

    async def serve(stop: asyncio.Event) -> None:
        await Broker(assemble(settings, checks="direct")).run(stop)  # on the running loop

    _run_until_signal(serve)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from broker.config import load_settings_file
    from broker.leases.migrations import migrate
    from broker.logs import configure_logging

    settings = load_settings_file(args.config) if args.config else None
    if settings is not None and settings.log_level == "debug":
        configure_logging("debug")  # a failure's traceback, which stderr's one line omits
    url = settings.store.url if settings is not None else _store_url(args.store_url)
    migrate(url)
    print("lease store migrated to the newest schema")
    return 0


def _store_url(url: str) -> str:
    from broker.leases.reach import scheme_problem

    problem = scheme_problem(url)
    if problem is not None:
        raise ConfigError(f"--store-url: {problem}")
    return url


def cmd_dev(args: argparse.Namespace) -> int:
    from broker.dev.environment import DEFAULT_POSTGRES_URL, DevEnvironment
    from broker.logs import configure_logging

    configure_logging(args.log_level)
    pg = None if args.no_postgres else (args.postgres_url or DEFAULT_POSTGRES_URL)
    env = DevEnvironment(args.dir, port=args.port, postgres_url=pg)
    _run_until_signal(env.run)
    print("stopped", file=sys.stderr)
    return 0


def cmd_dev_token(args: argparse.Namespace) -> int:
    from broker.dev.issuer import DevIssuer, dev_token_ttl

    directory = args.token_dir or args.dir
    try:
        ttl = dev_token_ttl(args.ttl)
    except ValueError as exc:
        raise ConfigError(f"--ttl: {exc}") from None
    try:
        issuer = DevIssuer.load(directory)
    except FileNotFoundError:
        raise ConfigError(
            f"{directory}: no dev issuer here; start `broker dev` first (or pass --dir)"
        ) from None
    claims = {}
    for item in args.claim:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--claim {item!r}: expected KEY=VALUE")
        claims[key] = value
    print(issuer.mint(instance=args.instance, workload=args.workload, ttl=ttl, claims=claims))
    return 0


def cmd_hash(args: argparse.Namespace) -> int:
    token = sys.stdin.readline().strip()
    if not token:
        raise ConfigError("give the admin token on standard input")
    print(hashlib.sha256(token.encode()).hexdigest())
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    # Imported here, and broker.config nowhere on this path: the agent runs in a pod
    # with a small memory limit and loads only what it uses.
    from broker.agent.agent import main as run_agent
    from broker.agent.options import config_from

    return run_agent(config_from(args))
def cmd_injector(args: argparse.Namespace) -> int:
    from broker.config import load_yaml_model
    from broker.injector.server import InjectorServer
    from broker.injector.settings import InjectorSettings
    from broker.logs import configure_logging

    settings = load_yaml_model(
        InjectorSettings,
        args.config,
        overrides={"listen": args.listen, "broker_url": args.broker_url},
    )
    server = InjectorServer(settings, insecure_http=args.insecure_http)  # refuses off loopback
    configure_logging(settings.log_level)
    _run_until_signal(server.run)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "migrate":
            return cmd_migrate(args)
        if args.command == "dev":
            return cmd_dev_token(args) if args.dev_command == "token" else cmd_dev(args)
        if args.command == "hash-admin-token":
            return cmd_hash(args)
        if args.command == "agent":
            return cmd_agent(args)
        if args.command == "injector":
            return cmd_injector(args)
    except ConfigError as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 2
    except StartupFailure as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 1
    except BrokerError as exc:
        print(f"broker: {exc.message} ({exc.code})", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
