"""Why the lease store cannot be reached: the pure verdict over every symptom a driver
gives (asyncpg's SQLSTATEs, psycopg's text, socket errors), the store named without its
password, and the URL schemes refused at config load."""

from __future__ import annotations

import socket

import pytest

from broker.errors import ConfigError, StartupFailure
from broker.leases.reach import (
    Symptoms,
    classify,
    diagnose,
    scheme_problem,
    store_place,
    unreachable,
)

CASES = [
    # (symptoms, reason starts with, retrying helps)
    (Symptoms(sqlstates=frozenset({"3D000"})), "the database does not exist", False),
    (Symptoms(text='connection failed: fatal:  database "app" does not exist'),
     "the database does not exist", False),
    (Symptoms(sqlstates=frozenset({"28P01"})), "the server refused the login", False),
    (Symptoms(text="fatal: password authentication failed for user \"x\""),
     "the server refused the login", False),
    (Symptoms(sqlstates=frozenset({"28000"})), "the server refused the login", False),
    (Symptoms(text='fatal:  role "nouser" does not exist'), "the server refused the login", False),
    (Symptoms(text="fatal: no pg_hba.conf entry for host"), "the server refused the login", False),
    (Symptoms(sqlstates=frozenset({"57P03"})), "the server is starting up", True),
    (Symptoms(text="fatal: the database system is starting up"), "the server is starting up",
     True),
    (Symptoms(sqlstates=frozenset({"53300"})), "the server has too many connections", True),
    (Symptoms(text="fatal: sorry, too many clients already"),
     "the server has too many connections", True),
    (Symptoms(unresolved=True), "the host name does not resolve", False),
    (Symptoms(text="failed to resolve host 'db.invalid'"), "the host name does not resolve",
     False),
    (Symptoms(refused=True), "connection refused", True),
    (Symptoms(text="port 5999 failed: connection refused"), "connection refused", True),
    (Symptoms(timed_out=True), "no answer within 5s", True),
    (Symptoms(text="connection timeout expired"), "no answer within 5s", True),
    (Symptoms(text="received invalid response to ssl negotiation"), "TLS negotiation failed",
     False),
    (Symptoms(text="(sqlite3.operationalerror) unable to open database file"),
     "the file cannot be opened", False),
    (Symptoms(os_error="Network is unreachable"), "network is unreachable", True),
    (Symptoms(kind="DBAPIError"), "unexpected DBAPIError", True),
]


@pytest.mark.parametrize(("symptoms", "reason", "retry"), CASES,
                         ids=[f"{i}-{c[1][:20]}" for i, c in enumerate(CASES)])
def test_every_symptom_has_a_verdict(symptoms: Symptoms, reason: str, retry: bool) -> None:
    verdict = classify(symptoms, timeout_s=5)
    assert verdict.reason.startswith(reason)
    assert verdict.retry_helps is retry
    assert verdict.advice


def test_a_missing_database_wins_over_the_socket_symptoms() -> None:
    both = Symptoms(sqlstates=frozenset({"3D000"}), refused=True, timed_out=True)
    assert classify(both).retry_helps is False


class _Wrapped(Exception):
    """SQLAlchemy's shape: the driver's error in ``orig``, with its SQLSTATE."""

    def __init__(self, orig: BaseException) -> None:
        super().__init__("(wrapped) " + str(orig))
        self.orig = orig


class _PgError(Exception):
    sqlstate = "3D000"


@pytest.mark.parametrize(("exc", "reason"), [
    (socket.gaierror(-2, "Name or service not known"), "the host name does not resolve"),
    (ConnectionRefusedError(111, "Connect call failed"), "connection refused"),
    (TimeoutError(), "no answer"),
    (_Wrapped(_PgError('database "x" does not exist')), "the database does not exist"),
    (OSError(101, "Network is unreachable"), "network is unreachable"),
], ids=["gaierror", "refused", "timeout", "wrapped-sqlstate", "oserror"])
def test_diagnose_reads_the_exception_chain(exc: BaseException, reason: str) -> None:
    assert classify(diagnose(exc)).reason.startswith(reason)


def test_diagnose_follows_causes() -> None:
    try:
        try:
            raise ConnectionRefusedError(111, "refused")
        except OSError as inner:
            raise RuntimeError("connect failed") from inner
    except RuntimeError as outer:
        assert diagnose(outer).refused


@pytest.mark.parametrize(("url", "place"), [
    ("postgresql://broker:s3cret@db.internal:6432/leases",
     'PostgreSQL database "leases" on db.internal:6432 as user broker'),
    ("postgresql://db.internal/leases", 'PostgreSQL database "leases" on db.internal:5432'),
    ("postgres://u:p%40ss@[::1]/x", 'PostgreSQL database "x" on [::1]:5432 as user u'),
    ("postgresql+psycopg://u@h:1/", 'PostgreSQL database "u" on h:1 as user u'),
    ("postgresql://u:pw@h:notaport/x", "PostgreSQL database (store.url does not parse)"),
    ("sqlite:////var/lib/broker/broker.db", "SQLite file /var/lib/broker/broker.db"),
    ("sqlite:///broker.db", "SQLite file broker.db"),
], ids=["full", "no-user", "ipv6-quoted-password", "psycopg-no-db", "bad-port", "sqlite-abs",
        "sqlite-rel"])
def test_the_store_is_named_without_its_password(url: str, place: str) -> None:
    assert store_place(url) == place
    assert "s3cret" not in place and "p@ss" not in place and "pw" not in place.split()


def test_the_error_class_says_whether_retrying_helps() -> None:
    url = "postgresql://broker:s3cret@db:5432/leases"
    permanent = unreachable(url, socket.gaierror(-2, "Name or service not known"))
    assert isinstance(permanent, ConfigError)
    assert str(permanent) == (
        'cannot reach the lease store, PostgreSQL database "leases" on db:5432 as user broker: '
        "the host name does not resolve; retrying will not help: correct the host in store.url")
    transient = unreachable(url, ConnectionRefusedError(111, "refused"))
    assert isinstance(transient, StartupFailure)
    assert str(transient).endswith(
        "connection refused, nothing listens there; retrying can help once it is up")
    assert "s3cret" not in str(permanent) + str(transient)


@pytest.mark.parametrize(("url", "ok"), [
    ("sqlite:///broker.db", True), ("sqlite://", True), ("postgresql://h/db", True),
    ("postgres://h/db", True), ("postgresql+psycopg://h/db", True), ("POSTGRESQL://h/db", True),
    ("mysql://h/db", False), ("postgresql+asyncpg://h/db", False), ("postgresqlx://h", False),
    ("broker.db", False), ("", False),
], ids=lambda v: str(v))
def test_only_sqlite_and_postgresql_urls_are_accepted(url: str, ok: bool) -> None:
    problem = scheme_problem(url)
    assert (problem is None) is ok
    if problem is not None:
        assert "sqlite:///PATH or postgresql://" in problem
