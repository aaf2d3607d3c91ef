"""Direct checks: whether a credential is dead, asked of the system that honours it rather
than of Vault, for a lease Vault no longer knows although the broker never revoked it
(Vault restored from an older snapshot, storage replaced, a mount re-enabled).

Each answer is ``True`` (confirmed dead), ``False`` (confirmed still valid) or ``None``
(this check cannot tell); only ``True`` lets the broker record the lease as revoked, and
anything else leaves it ``lost`` for an operator. Which engines can be checked:

- ``pki``: the certificate's serial against its mount's CRL (``<mount>/cert/crl``, public;
  no setting). On the CRL: dead. Not on it: still valid until it expires.
- ``database`` with PostgreSQL, when the role sets ``check`` (a read-only login that reads
  ``pg_roles``): no role of that name in any case: dead; one exists: still valid; the
  server is a replica, or lacks the role ``check.expect_role`` names: cannot tell.
- every other engine: cannot tell.

The check never holds the credential itself: it looks the identifier
(``credential_ref``: a serial, a username) up. I/O lives here, in a thin shell: the
serial and mount parsing are ``broker.vault.crl``'s pure functions.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg.conninfo import make_conninfo

from broker.engines.role import DatabaseCheck, RoleSettings
from broker.errors import UpstreamRejected, UpstreamUnavailable
from broker.vault.client import VaultClient
from broker.vault.crl import Crl, parse_serial, pki_mount

log = logging.getLogger(__name__)

# One round trip: is this server a replica (its pg_roles may lag the primary's), does a
# role of that name exist in any case (PostgreSQL folds an unquoted name to lower case:
# "V-App" created unquoted is "v-app"), and, when the operator named one, does the role
# that proves this is the right server exist.
_ASK = (
    "SELECT pg_is_in_recovery(), "
    "EXISTS (SELECT 1 FROM pg_roles WHERE lower(rolname) = lower(%(name)s)), "
    "CASE WHEN %(control)s::text IS NULL THEN NULL "
    "ELSE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %(control)s::text) END"
)

# The checker's connection is kept between answers (a pass meets many lost leases) and
# closed once it has been idle this long.
CONNECTION_IDLE_S = 10.0


class CheckedLease(Protocol):
    """What a check reads of a lease (``broker.leases.views.LeaseView`` has it)."""

    @property
    def lease_id(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def vault_path(self) -> str | None: ...
    @property
    def credential_ref(self) -> Mapping[str, str] | None: ...


class Check(Protocol):
    name: str

    async def gone(self, lease: CheckedLease) -> bool | None: ...


@dataclass(frozen=True)
class Verdict:
    """An answer and the check that gave it (``broker.leases.ending.CheckAnswer``)."""

    gone: bool | None
    by: str


def _ref(lease: CheckedLease, key: str) -> str | None:
    value = (lease.credential_ref or {}).get(key)
    return value if isinstance(value, str) and value else None


class CrlCheck:
    """A PKI certificate: is its serial on its mount's CRL?"""

    name = "crl"

    def __init__(self, crl: Crl) -> None:
        self._crl = crl

    async def gone(self, lease: CheckedLease) -> bool | None:
        text = _ref(lease, "serial_number")
        mount = pki_mount(lease.vault_path or "")
        if text is None or mount is None:
            return None
        try:
            serial = parse_serial(text)
        except ValueError:
            return None
        try:
            revoked = await self._crl.revoked(mount)
        except (UpstreamUnavailable, UpstreamRejected) as exc:
            log.warning(
                "direct check: cannot read the CRL",
                extra={"lease_id": lease.lease_id, "mount": mount, "code": exc.code},
            )
            return None
        return serial in revoked


def role_answer(in_recovery: bool, exists: bool, control: bool | None) -> bool | None:
    """What PostgreSQL's answer means. A replica cannot tell (its catalogue may lag: a role
    just created on the primary is not there yet); nor can a server that lacks the
    operator's control role (``check.expect_role``: it is not the server the logins live
    on). Otherwise a role of that name in any case: still valid; none: dead."""
    if in_recovery or control is False:
        return None
    return not exists


class PostgresRoleCheck:
    """A PostgreSQL login from Vault's database engine: does its role still exist?"""

    name = "database"

    def __init__(self, settings: DatabaseCheck, *, idle_s: float = CONNECTION_IDLE_S) -> None:
        self._settings = settings
        self._idle_s = idle_s
        self._lock = asyncio.Lock()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._used = 0.0
        self._closer: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None  # held: a task is weakly referenced

    async def gone(self, lease: CheckedLease) -> bool | None:
        username = _ref(lease, "username")
        if username is None:
            return None
        s = self._settings
        async with self._lock:
            try:
                row = await asyncio.wait_for(self._ask(username), s.timeout_s)
            except asyncio.CancelledError:  # mid-query: never reused, closed aside
                conn, self._conn = self._conn, None
                if conn is not None:
                    self._closing = asyncio.get_running_loop().create_task(conn.close())
                raise
            except Exception as exc:  # psycopg, OSError, timeouts: the check cannot tell
                await self._drop()
                log.warning(
                    "direct check: cannot ask PostgreSQL",
                    extra={"lease_id": lease.lease_id, "checker": s.where,
                           "error": type(exc).__name__},
                )
                return None
            self._close_when_idle()
        in_recovery, exists, control = bool(row[0]), bool(row[1]), row[2]
        if in_recovery:
            log.warning(
                "direct check: the checker's server is a read replica: it cannot tell "
                "(point check.url at the primary)",
                extra={"lease_id": lease.lease_id, "checker": s.where},
            )
        elif control is False:
            log.warning(
                "direct check: the checker's server has no role check.expect_role names: "
                "it is not the server the logins live on, it cannot tell",
                extra={"lease_id": lease.lease_id, "checker": s.where},
            )
        return role_answer(in_recovery, exists, None if control is None else bool(control))

    async def _ask(self, username: str) -> tuple[Any, ...]:
        s = self._settings
        if self._conn is None or self._conn.closed:
            extra = {"password": s.password.get_secret_value()} if s.password is not None else {}
            conninfo = make_conninfo(
                s.url, connect_timeout=max(1, math.ceil(s.timeout_s)), **extra
            )
            self._conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        cur = await self._conn.execute(_ASK, {"name": username, "control": s.expect_role})
        row = await cur.fetchone()
        assert row is not None  # a SELECT without FROM answers one row
        return tuple(row)

    def _close_when_idle(self) -> None:
        self._used = time.monotonic()
        if self._closer is None or self._closer.done():
            self._closer = asyncio.get_running_loop().create_task(self._idle_then_close())

    async def _idle_then_close(self) -> None:
        while True:
            await asyncio.sleep(max(0.0, self._used + self._idle_s - time.monotonic()))
            async with self._lock:
                if time.monotonic() - self._used >= self._idle_s:
                    await self._drop()
                    return

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:  # noqa: BLE001 — a broken connection is closed all the same
                log.debug("direct check: closing the checker's connection failed")

    async def close(self) -> None:
        if self._closer is not None:
            self._closer.cancel()
            self._closer = None
        async with self._lock:
            await self._drop()


class DirectChecks:
    """The one object the lease-ending decision asks: dispatches by the lease's role to
    the check its engine has, if any (``broker.leases.ending.CredentialCheck``)."""

    def __init__(self, roles: Mapping[str, RoleSettings], vault: VaultClient) -> None:
        crl = CrlCheck(Crl(vault))
        self._by_role: dict[str, Check] = {}
        self._databases: list[PostgresRoleCheck] = []
        for role_name, role in roles.items():
            kind = check_name(role)
            if kind == CrlCheck.name:
                self._by_role[role_name] = crl
            elif kind == PostgresRoleCheck.name and role.check is not None:
                check = PostgresRoleCheck(role.check)
                self._databases.append(check)
                self._by_role[role_name] = check

    def check_for(self, lease: CheckedLease) -> Check | None:
        """The check that can answer for this lease's role; None: none can."""
        return self._by_role.get(lease.role)

    async def gone(self, lease: CheckedLease) -> Verdict:
        """The answer for this lease, with the name of the check that gave it ("crl",
        "database"; "direct" when none can answer for its role)."""
        check = self.check_for(lease)
        if check is None:
            return Verdict(None, "direct")
        answer = await check.gone(lease)
        log.info(
            "direct check answered",
            extra={
                "lease_id": lease.lease_id,
                "role": lease.role,
                "check": check.name,
                "gone": answer,
            },
        )
        return Verdict(answer, check.name)

    async def close(self) -> None:
        """Close the database checkers' idle connections."""
        for check in self._databases:
            await check.close()


def check_name(role: RoleSettings) -> str | None:
    """Which check a role's lost leases get (``crl``, ``database``); None: none."""
    if role.engine == "pki":
        return CrlCheck.name
    if role.engine == "database" and role.check is not None:
        return PostgresRoleCheck.name
    return None
