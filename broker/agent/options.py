"""``broker agent``'s command line (the injector emits exactly this; see the README's
Kubernetes section) and the settings it becomes. Everything comes from arguments: the
agent reads no environment variable."""

from __future__ import annotations

import argparse
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from broker.agent.spec import CredentialSpec, SpecError, build_specs
from broker.agent.state import DEFAULT_NAME
from broker.durations import parse_duration
from broker.errors import ConfigError
from broker.tls import parse_ca_pem, why_not_loaded

OnExit = Literal["terminate", "release", "keep"]
ON_EXIT: tuple[OnExit, ...] = ("terminate", "release", "keep")
MAX_EXIT_TIMEOUT_S = 600


@dataclass(frozen=True)
class AgentConfig:
    broker_url: str
    token_file: Path
    directory: Path
    credentials: tuple[CredentialSpec, ...]
    once: bool = False
    on_exit: OnExit = "terminate"
    ready_listen: tuple[str, int] | None = None
    state_file: Path | None = None  # None: DIRECTORY/.agent-state.json
    ca_file: Path | None = None
    ca_pem: str | None = None  # PEM certificates (checked), exclusive with ca_file
    exit_timeout_s: float = 20.0

    @property
    def state_path(self) -> Path:
        return self.state_file or self.directory / DEFAULT_NAME

    def broker_tls(self) -> ssl.SSLContext | bool:
        """How the broker's certificate is verified: against the CA given, or (True) the
        system's CAs. ``ssl.SSLError`` or ``OSError`` for a bundle that does not load."""
        if self.ca_pem is not None:
            return ssl.create_default_context(cadata=self.ca_pem)
        if self.ca_file is not None:
            return ssl.create_default_context(cafile=str(self.ca_file))
        return True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker-url", required=True, help="the broker, e.g. https://broker:8300")
    p.add_argument(
        "--token-file",
        required=True,
        type=Path,
        help="the pod's projected service-account token (read for every call)",
    )
    p.add_argument(
        "--dir",
        required=True,
        type=Path,
        dest="directory",
        help="where the credential files are written",
    )
    p.add_argument(
        "--credential",
        action="append",
        default=[],
        metavar="NAME=ROLE[,k=v...]",
        help="a credential to keep (repeatable): NAME=ROLE[,format=F][,perms=0400]"
        "[,ttl=15m][,keygen=K][,cn=NAME][,signal=SIG:PROC][,command=JSON]",
    )
    p.add_argument(
        "--template",
        action="append",
        default=[],
        metavar="NAME=TEXT",
        help="the string.Template text of a format=template credential",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="fetch and write every credential, then exit 0 (init containers)",
    )
    p.add_argument(
        "--on-exit",
        choices=ON_EXIT,
        default="terminate",
        help="on SIGTERM: end the instance, give back its leases, or keep them",
    )
    p.add_argument(
        "--ready-listen",
        metavar="HOST:PORT",
        help="serve GET /ready and GET /healthz here, e.g. 127.0.0.1:8399",
    )
    p.add_argument("--state-file", type=Path, help="default: DIR/.agent-state.json")
    ca = p.add_mutually_exclusive_group()
    ca.add_argument("--ca-file", type=Path, help="CA bundle for the broker's TLS certificate")
    ca.add_argument(
        "--ca-pem",
        metavar="PEM",
        help="the same as PEM text (the injector passes the CA it is configured with)",
    )
    p.add_argument(
        "--exit-timeout",
        default="20s",
        help="how long giving back may take on SIGTERM (default 20s)",
    )


def listen_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not 0 <= number <= 65535:
        raise ConfigError(
            f"--ready-listen {value!r}: expected IP:PORT, e.g. 127.0.0.1:8399 or 0.0.0.0:8399"
        )
    return host, number


def config_from(args: argparse.Namespace) -> AgentConfig:
    """The agent's settings from parsed arguments; ``ConfigError`` saying what to fix."""
    try:
        specs = build_specs(args.credential, args.template)
    except SpecError as exc:
        raise ConfigError(str(exc)) from None
    url = urlsplit(args.broker_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError("--broker-url: expected an http(s) URL, e.g. https://broker:8300")
    if url.scheme == "http" and not _loopback(url.hostname):
        raise ConfigError(
            "--broker-url: the token and the credentials cross the network: use https:// "
            "(plain http only to a loopback address)"
        )
    try:
        exit_timeout = parse_duration(args.exit_timeout)
    except ValueError as exc:
        raise ConfigError(f"--exit-timeout: {exc}") from None
    if not 1 <= exit_timeout <= MAX_EXIT_TIMEOUT_S:
        raise ConfigError(f"--exit-timeout: expected 1s to {MAX_EXIT_TIMEOUT_S}s")
    if not args.directory.is_dir():
        raise ConfigError(f"--dir {args.directory}: not a directory")
    if args.ca_file is not None and not args.ca_file.is_file():
        raise ConfigError(f"--ca-file {args.ca_file}: no such file")
    ca_pem = None
    if args.ca_pem is not None:
        try:
            ca_pem = parse_ca_pem(args.ca_pem)
        except ValueError as exc:
            raise ConfigError(f"--ca-pem: {exc}") from None
    config = AgentConfig(
        broker_url=args.broker_url,
        token_file=args.token_file,
        directory=args.directory,
        credentials=specs,
        once=args.once,
        on_exit=args.on_exit,
        ready_listen=listen_address(args.ready_listen) if args.ready_listen else None,
        state_file=args.state_file,
        ca_file=args.ca_file,
        ca_pem=ca_pem,
        exit_timeout_s=float(exit_timeout),
    )
    if config.ca_file is not None:
        try:
            config.broker_tls()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                f"--ca-file {config.ca_file}: not a CA bundle ({why_not_loaded(exc)})"
            ) from None
    return config


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
