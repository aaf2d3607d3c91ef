"""What every brokerctl command module shares: the HTTP ``Client`` over the admin API,
``CtlError`` and the exit codes it carries (listed in ``broker.cli.ctl``'s docstring), a
``Listing`` and ``table`` to show results, and ``command``, which adds a leaf taking the
connection flags. The command modules (``ctl_revoke``, ``ctl_listings``, ``ctl_locks``,
``ctl_audit``) import this; ``broker.cli.ctl`` imports them and runs the one asked for.
Nothing here reads the environment: ``broker.cli.ctl`` gives the top-level flags their
defaults from it."""

from __future__ import annotations

import argparse
import ipaddress
import json
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.durations import parse_duration

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_AUTH, EXIT_UNAVAILABLE, EXIT_TIMEOUT = (
    0,
    1,
    2,
    3,
    4,
    5,
    6,
)
EXIT_FINDINGS = 7
EXIT_TAMPERED = 8
EXIT_NEVER_SEEN = 9
EXIT_REFUSED = 10


class CtlError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _loopback(url: str) -> bool:
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _trust(ca_file: str | None) -> ssl.SSLContext | None:
    """The CA bundle to verify the broker's certificate with (None: the system's)."""
    if ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as exc:
        why = str(exc.reason or exc).lower().replace("_", " ")
        raise CtlError(f"--ca-file {ca_file}: not a CA bundle ({why})", EXIT_USAGE) from None
    except OSError as exc:
        raise CtlError(f"--ca-file {ca_file}: {exc.strerror}", EXIT_USAGE) from None


class Client:
    def __init__(
        self, url: str, token: str, timeout: float = 30.0, ca_file: str | None = None
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise CtlError(f"BROKER_URL must be an http(s) URL, got {url[:60]!r}", EXIT_USAGE)
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.ssl = _trust(ca_file)
        if url.startswith("http://") and not _loopback(url):
            print(
                f"brokerctl: warning: {self.url} is plain http: the admin token crosses the "
                "network in clear text; use https:// (or a port-forward to 127.0.0.1)",
                file=sys.stderr,
            )

    def call(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
    ) -> Any:
        q = {k: v for k, v in (query or {}).items() if v is not None}
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(q)}" if q else "")
        req = urllib.request.Request(  # noqa: S310 — http(s) only, checked in __init__
            url,
            method=method,
            data=json.dumps(body).encode()
            if body is not None
            else (b"" if method == "POST" else None),
            headers={
                "Authorization": f"Bearer {self.token}",
                "Accept": "application/json",
                "Content-Type": "application/json",
            },
        )
        try:
            # The URL is the operator's BROKER_URL; only http(s) is accepted in main().
            with urllib.request.urlopen(  # noqa: S310
                req, timeout=self.timeout, context=self.ssl
            ) as resp:
                answer = resp.read()
                return json.loads(answer) if answer else None
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read())["error"]
                message = f"{err['message']} ({err['code']})"
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {exc.code}"
            code = {401: EXIT_AUTH, 403: EXIT_AUTH, 404: EXIT_NOT_FOUND, 503: EXIT_UNAVAILABLE}.get(
                exc.code, EXIT_FAILED
            )
            if exc.code in (401, 403):
                message += "; set BROKER_ADMIN_TOKEN or pass --admin-token"
            raise CtlError(message, code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise CtlError(
                    f"the broker's TLS certificate at {self.url} is not trusted "
                    f"({reason.verify_message}); pass --ca-file or set BROKER_CA_FILE to "
                    "the CA that signed it",
                    EXIT_UNAVAILABLE,
                ) from None
            raise CtlError(
                f"cannot reach the broker at {self.url}: {reason}; set BROKER_URL or pass --url",
                EXIT_UNAVAILABLE,
            ) from None


@dataclass(frozen=True)
class Listing:
    """A list a command shows: ``-o json`` prints ``{key: items, **fields}`` (``fields``
    holds ``next``, the cursor where the list was cut, None when complete, and any
    totals); a table or ``-o jsonl`` prints the items, and ``notice`` on stderr when the
    list was cut. Every command that lists returns one, so no list is cut silently."""

    key: str
    items: list[dict[str, Any]]
    fields: dict[str, Any] = field(default_factory=dict)
    notice: str | None = None


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


LEASE_COLUMNS = ["lease_id", "instance_id", "workload", "role", "kind", "state", "expires_at"]


def said(args: argparse.Namespace) -> dict[str, str]:
    """An admin action's --reason and --incident, where given (recorded and audited)."""
    return {
        k: v
        for k, v in (
            ("reason", getattr(args, "reason", None)),
            ("incident", getattr(args, "incident", None)),
        )
        if v
    }


def connection_flags(p: argparse.ArgumentParser, defaults: Mapping[str, Any] | None) -> None:
    """The flags every command takes, before or after the subcommand (``-o json`` anywhere,
    as kubectl and vault users expect). ``defaults``: the top-level parser's defaults of
    ``url``, ``admin_token`` and ``ca_file`` (``broker.cli.ctl`` reads them from the
    environment). None: a leaf parser, whose flags have no default of their own, so a flag
    given before the subcommand is not overwritten by the leaf's default."""

    def default(name: str, value: Any = None) -> Any:
        if defaults is None:
            return argparse.SUPPRESS
        return defaults[name] if value is None else value

    p.add_argument("--url", default=default("url"), help="default: $BROKER_URL")
    p.add_argument(
        "--admin-token",
        default=default("admin_token"),
        help="default: $BROKER_ADMIN_TOKEN",
    )
    p.add_argument(
        "--ca-file",
        default=default("ca_file"),
        help="CA bundle for the broker's TLS certificate (default: $BROKER_CA_FILE; "
        "without it, the system's CAs)",
    )
    p.add_argument(
        "-o", "--output", choices=["table", "json", "jsonl"], default=default("output", "table")
    )


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    connection_flags(common, None)
    return common


def command(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A leaf command under ``sub`` (a subparsers action) that takes the common flags too.
    Every command module registers its leaves through this."""
    parser: argparse.ArgumentParser = sub.add_parser(name, parents=[_common()], **kwargs)
    return parser


def said_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reason", help="why: recorded with the action and in the audit")
    p.add_argument("--incident", help="an incident reference (e.g. INC-1234)")


def moment(text: str, now: datetime) -> datetime:
    """A time as every ``--since`` / ``--issued-after`` takes it: a duration back from
    ``now`` (``90m``, ``2h``, ``1d``) or an ISO 8601 time (``2026-12-02T10:00:00Z``;
    without a zone, UTC, as the broker reads it). Raises ``ValueError`` saying what was
    expected."""
    try:
        ago = parse_duration(text)
    except ValueError:
        pass
    else:
        return now - timedelta(seconds=ago)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"expected a duration like 2h or a time like 2026-12-02T10:00:00Z, got {text[:40]!r}"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
