"""Why the lease store cannot be reached, in one line an operator can act on: which
database on which host (never the URL's password), what went wrong, and whether retrying
can help. ``broker migrate`` and ``broker serve`` say it at start-up instead of a driver's
traceback (kept at debug level).

The decision is pure (``classify`` over the symptoms: SQLSTATEs, the kind of socket
error, the driver's text); ``diagnose`` only collects the symptoms from an exception
chain. asyncpg (serving) gives SQLSTATEs; psycopg (migrations) often only text.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from broker.errors import ConfigError, StartupFailure

SUPPORTED_SCHEMES = ("sqlite", "postgresql", "postgres", "postgresql+psycopg")
SCHEMES_HELP = "sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE"


def scheme_problem(url: str) -> str | None:
    """None if ``url`` names a store the broker supports, else what to write instead."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        return f"expected a URL ({SCHEMES_HELP})"
    if scheme.lower() not in SUPPORTED_SCHEMES:
        return (
            f"unsupported scheme {scheme!r}: the lease store is SQLite or PostgreSQL "
            f"({SCHEMES_HELP})"
        )
    return None


def store_place(url: str) -> str:
    """The store, named without its password: 'PostgreSQL database "app" on db:5432 as
    user broker' or 'SQLite file /var/lib/broker.db'."""
    if url.startswith("sqlite"):
        path = url.split("://", 1)[-1]
        path = path[1:] if path.startswith("/") else path
        return f"SQLite file {path or '(in memory)'}"
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "localhost", parts.port or 5432
        user = unquote(parts.username) if parts.username else None
    except ValueError:  # a port that is not a number: the URL is still not printed
        return "PostgreSQL database (store.url does not parse)"
    database = unquote(parts.path.lstrip("/")) or (user or "postgres")
    shown = f"[{host}]" if ":" in host else host
    as_user = f" as user {user}" if user else ""
    return f'PostgreSQL database "{database}" on {shown}:{port}{as_user}'


@dataclass(frozen=True)
class Symptoms:
    sqlstates: frozenset[str] = frozenset()
    unresolved: bool = False  # the host name does not resolve
    refused: bool = False
    timed_out: bool = False
    os_error: str | None = None  # another socket error's strerror
    text: str = ""  # the drivers' messages, lower case, for what only text says
    kind: str = "error"  # the outermost exception's type name, for the unclassified


@dataclass(frozen=True)
class Verdict:
    reason: str
    retry_helps: bool
    advice: str  # after "retrying can help " or "retrying will not help: "


# SQLSTATE → (reason, retrying helps, advice); then the same from the drivers' text.
_BY_STATE: dict[str, tuple[str, bool, str]] = {
    "3D000": ("the database does not exist", False, "create it, or correct store.url"),
    "28P01": ("the server refused the login", False, "check the user and password"),
    "28000": ("the server refused the login", False, "check the user and pg_hba.conf"),
    "57P03": ("the server is starting up or shutting down", True, "shortly"),
    "53300": ("the server has too many connections", True, "shortly"),
}
_BY_TEXT: tuple[tuple[str, str], ...] = (
    ("database \"", "3D000"),  # 'database "x" does not exist'
    ("password authentication failed", "28P01"),
    ("role \"", "28000"),  # 'role "x" does not exist'
    ("no pg_hba.conf entry", "28000"),
    ("the database system is", "57P03"),
    ("too many clients", "53300"),
)


def classify(s: Symptoms, timeout_s: float | None = None) -> Verdict:
    states = set(s.sqlstates)
    for needle, state in _BY_TEXT:
        if needle in s.text and (state != "3D000" or "does not exist" in s.text):
            states.add(state)
    for state, (reason, retry, advice) in _BY_STATE.items():
        if state in states:
            return Verdict(reason, retry, advice)
    if s.unresolved or "failed to resolve host" in s.text or "could not translate host" in s.text:
        return Verdict("the host name does not resolve", False, "correct the host in store.url")
    if s.refused or "connection refused" in s.text:
        return Verdict("connection refused, nothing listens there", True, "once it is up")
    if s.timed_out or "timeout expired" in s.text:
        within = f" within {timeout_s:g}s" if timeout_s else ""
        return Verdict(f"no answer{within}", True, "if the network or the server is only slow")
    if "ssl" in s.text:
        return Verdict(
            "TLS negotiation failed", False, "check the server's TLS and sslmode in store.url"
        )
    if "unable to open database file" in s.text:
        return Verdict(
            "the file cannot be opened", False, "check that its directory exists and is writable"
        )
    if s.os_error:
        return Verdict(s.os_error[:1].lower() + s.os_error[1:], True, "once that is fixed")
    return Verdict(
        f"unexpected {s.kind} (the log at debug level has the details)", True, "if it is temporary"
    )


def diagnose(exc: BaseException) -> Symptoms:
    """The symptoms in ``exc`` and what it wraps (SQLAlchemy's ``orig``, causes)."""
    states: set[str] = set()
    texts: list[str] = []
    unresolved = refused = timed_out = False
    os_error: str | None = None
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        state = getattr(current, "sqlstate", None)
        if isinstance(state, str) and state:
            states.add(state)
        if isinstance(current, socket.gaierror):
            unresolved = True
        elif isinstance(current, ConnectionRefusedError):
            refused = True
        elif isinstance(current, TimeoutError):
            timed_out = True
        elif isinstance(current, OSError) and current.strerror:
            os_error = current.strerror
        texts.append(str(current).lower())
        orig = getattr(current, "orig", None)
        current = (
            orig
            if isinstance(orig, BaseException)
            else current.__cause__ or current.__context__
        )
    return Symptoms(
        sqlstates=frozenset(states),
        unresolved=unresolved,
        refused=refused,
        timed_out=timed_out,
        os_error=os_error,
        text=" | ".join(texts),
        kind=type(exc).__name__,
    )


def unreachable(url: str, exc: BaseException, timeout_s: float | None = None) -> Exception:
    """The error ``broker migrate``/``serve`` stop with: a ``ConfigError`` (exit 2) when
    retrying cannot help, else a ``StartupFailure`` (exit 1)."""
    verdict = classify(diagnose(exc), timeout_s)
    retry = (
        f"retrying can help {verdict.advice}"
        if verdict.retry_helps
        else f"retrying will not help: {verdict.advice}"
    )
    line = f"cannot reach the lease store, {store_place(url)}: {verdict.reason}; {retry}"
    return StartupFailure(line) if verdict.retry_helps else ConfigError(line)
