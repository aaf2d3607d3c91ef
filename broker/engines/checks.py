"""Direct checks: whether a credential is dead, asked of the system that honours it rather
than of Vault, for a lease Vault no longer knows although the broker never revoked it
(Vault restored from an older snapshot, storage replaced, a mount re-enabled).

Each answer is ``True`` (confirmed dead), ``False`` (confirmed still valid) or ``None``
(this check cannot tell); only ``True`` lets the broker record the lease as revoked, and
anything else leaves it ``lost`` for an operator. Which engines can be checked:

- ``pki``: the certificate's serial against its mount's CRL (``<mount>/cert/crl``, public;
  no setting). On the CRL: dead. Not on it: still valid until it expires.
- ``database`` with PostgreSQL, when the role sets ``check`` (a read-only login that reads
  ``pg_roles``): no role of that name: dead; the role exists: still valid.
- every other engine: cannot tell.

The check never holds the credential itself: it looks the identifier
(``credential_ref``: a serial, a username) up. I/O lives here, in a thin shell: the
serial and mount parsing are ``broker.vault.crl``'s pure functions.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from typing import Protocol

import psycopg
from psycopg.conninfo import make_conninfo

from broker.engines.role import DatabaseCheck, RoleSettings
from broker.errors import UpstreamRejected, UpstreamUnavailable
from broker.vault.client import VaultClient
from broker.vault.crl import Crl, parse_serial, pki_mount

log = logging.getLogger(__name__)

_ROLE_EXISTS = "SELECT 1 FROM pg_roles WHERE rolname = %s"


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
                extra={"lease_id": lease.lease_id, "mount": mount, "error": exc.code},
            )
            return None
        return serial in revoked


class PostgresRoleCheck:
    """A PostgreSQL login from Vault's database engine: does its role still exist?"""

    name = "database"

    def __init__(self, settings: DatabaseCheck) -> None:
        self._settings = settings

    async def gone(self, lease: CheckedLease) -> bool | None:
        username = _ref(lease, "username")
        if username is None:
            return None
        s = self._settings
        try:
            found = await asyncio.wait_for(self._role_exists(username), s.timeout_s)
        except Exception as exc:  # psycopg, OSError, timeouts: the check cannot tell
            log.warning(
                "direct check: cannot ask PostgreSQL",
                extra={"lease_id": lease.lease_id, "checker": s.where, "error": type(exc).__name__},
            )
            return None
        return not found

    async def _role_exists(self, username: str) -> bool:
        s = self._settings
        extra = {"password": s.password.get_secret_value()} if s.password is not None else {}
        conninfo = make_conninfo(s.url, connect_timeout=max(1, math.ceil(s.timeout_s)), **extra)
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            cur = await conn.execute(_ROLE_EXISTS, (username,))
            return await cur.fetchone() is not None


class DirectChecks:
    """The one object the lease-ending decision asks: dispatches by the lease's role to
    the check its engine has, if any (``broker.leases.ending.CredentialCheck``)."""

    # The name of the check that gave the latest answer ("crl", "database"; "direct"
    # before any), for the audit's ``confirmed_by``: the decision reads it right after
    # ``gone`` returns, with no await in between, so no other lease's answer can come first.
    name: str = "direct"

    def __init__(self, roles: Mapping[str, RoleSettings], vault: VaultClient) -> None:
        crl = CrlCheck(Crl(vault))
        self._by_role: dict[str, Check] = {}
        for role_name, role in roles.items():
            kind = check_name(role)
            if kind == CrlCheck.name:
                self._by_role[role_name] = crl
            elif kind == PostgresRoleCheck.name and role.check is not None:
                self._by_role[role_name] = PostgresRoleCheck(role.check)

    def check_for(self, lease: CheckedLease) -> Check | None:
        """The check that can answer for this lease's role; None: none can."""
        return self._by_role.get(lease.role)

    async def gone(self, lease: CheckedLease) -> bool | None:
        check = self.check_for(lease)
        if check is None:
            self.name = "direct"
            return None
        answer = await check.gone(lease)
        self.name = check.name
        log.info(
            "direct check answered",
            extra={
                "lease_id": lease.lease_id,
                "role": lease.role,
                "check": check.name,
                "gone": answer,
            },
        )
        return answer


def check_name(role: RoleSettings) -> str | None:
    """Which check a role's lost leases get (``crl``, ``database``); None: none."""
    if role.engine == "pki":
        return CrlCheck.name
    if role.engine == "database" and role.check is not None:
        return PostgresRoleCheck.name
    return None
