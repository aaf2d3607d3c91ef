"""The lease database on SQLAlchemy (SQLite by default, PostgreSQL in production): the
engine, its SQLite pragmas, the one transaction helper, locks across replicas, and the
schema revision check.

SQLAlchemy and driver errors are translated to ``StoreUnavailable`` here; nothing above
this module sees them (``IntegrityError`` passes through: the SQL that provokes it on
purpose turns it into the broker's answer).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy import event, make_url, text
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from broker.errors import BrokerError, StoreUnavailable
from broker.leases.migrations import async_url, head_revision, probe
from broker.leases.reach import unreachable
from broker.leases.settings import StoreSettings
from broker.leases.sql.common import discard_audit, flush_audit

log = logging.getLogger(__name__)


# READ COMMITTED whatever the server's default: the instance lock relies on the statement
# after it taking a fresh snapshot (``sql.common.lock_instance``); under REPEATABLE READ
# the transaction's snapshot could predate a termination it waited for.
_SERVER_SETTINGS = {
    "application_name": "credential-broker",
    "default_transaction_isolation": "read committed",
}


class GeneralCase(Exception):  # noqa: N818 - not an error: a signal to take the other path
    """A one-round-trip statement met a case it does not serve (SQLSTATE ``BR001``) and
    wrote nothing: the caller runs the general path, which decides it."""


async def _keep(_: asyncpg.Connection) -> None:
    """No reset on release: the pool runs single statements in autocommit, whose locks
    are transaction-level and whose settings are the connection's own, so there is
    nothing to reset, and asyncpg's reset would cost a round trip per statement."""


class OneTrip:
    """Single statements on a plain asyncpg pool, each its own transaction (autocommit):
    one round trip, without SQLAlchemy's or a transaction's own (PostgreSQL only; the
    issuance hot path's server-side functions, ``broker.leases.sql.onetrip``)."""

    def __init__(self, pool: asyncpg.Pool, acquire_timeout_s: float) -> None:
        self._pool = pool
        self._acquire_timeout_s = acquire_timeout_s

    async def fetchval(self, query: str, *args: Any) -> Any:
        """The statement's first column of its first row."""
        return await self._run("fetchval", query, args)

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        """The statement's first row, or None."""
        return await self._run("fetchrow", query, args)

    async def _run(self, method: str, query: str, args: tuple[Any, ...]) -> Any:
        try:
            # Bounded like the SQLAlchemy pool's wait: a full pool fails the request (503).
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                return await getattr(conn, method)(query, *args)
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == "BR001":
                raise GeneralCase(str(exc)) from None
            failure: BaseException = exc
        except (asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            failure = exc
        # As ``Database.transaction``: the driver's text may quote values, so debug only.
        log.debug("a store statement failed", exc_info=failure)
        raise StoreUnavailable(
            f"the lease store is unavailable ({type(failure).__name__}); retry shortly",
            code="store_unavailable",
        )

    async def close(self) -> None:
        """Close the pool, waiting for statements in flight at most as long as a
        connection may take (``Pool.close`` waits for every checked-out connection: a
        statement stuck on a store that stopped answering would hold shutdown up to its
        ``command_timeout``); then the connections left are cut."""
        try:
            await asyncio.wait_for(self._pool.close(), self._acquire_timeout_s)
        except TimeoutError:
            log.warning("store statements still running at shutdown were cut")
            self._pool.terminate()


def _lock_id(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)


class Database:
    def __init__(self, settings: StoreSettings) -> None:
        self._settings = settings
        self._engine: AsyncEngine | None = None
        self.is_sqlite = settings.url.startswith("sqlite")
        # PostgreSQL's one-round-trip path (``store.one_round_trip``); None: general only.
        self.one_trip: OneTrip | None = None

    async def start(self) -> None:
        url = async_url(self._settings.url)
        if self.is_sqlite:
            engine = create_async_engine(url, connect_args={"timeout": 30})
            _sqlite_pragmas(engine)
        else:
            # No pre-ping: it costs a round trip per transaction. A connection that died
            # with the server fails one request (503), and SQLAlchemy then discards the pool.
            engine = create_async_engine(
                url,
                pool_size=self._settings.pool_size,
                max_overflow=self._settings.pool_size,
                pool_timeout=self._settings.connect_timeout_s,
                pool_recycle=1800,
                connect_args={
                    "timeout": self._settings.connect_timeout_s,
                    "command_timeout": 30,
                    "server_settings": _SERVER_SETTINGS,
                },
            )
            if self._settings.one_round_trip:
                self.one_trip = OneTrip(
                    await self._one_trip_pool(), self._settings.connect_timeout_s
                )
        self._engine = engine

    async def _one_trip_pool(self) -> asyncpg.Pool:
        """Connections are made when first used (``min_size=0``): a store not yet
        reachable fails its requests, not the start, as the SQLAlchemy pool does."""
        url = make_url(self._settings.url).set(drivername="postgresql")
        pool = await asyncpg.create_pool(
            url.render_as_string(hide_password=False),
            min_size=0,
            max_size=self._settings.pool_size,
            max_inactive_connection_lifetime=1800,
            reset=_keep,
            timeout=self._settings.connect_timeout_s,
            command_timeout=30,
            server_settings=_SERVER_SETTINGS,
        )
        assert pool is not None  # only None when created without awaiting
        return pool

    async def close(self) -> None:
        if self.one_trip is not None:
            await self.one_trip.close()
            self.one_trip = None
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    @asynccontextmanager
    async def transaction(self, *, readonly: bool = False) -> AsyncIterator[AsyncConnection]:
        """One transaction. ``readonly`` ones on SQLite start with a plain ``BEGIN``, so
        queries (admin listings, metrics) never hold the write lock issuance needs. Audit
        events recorded in it (``sql.common.audit``) are appended to the chain just before
        it commits, and forgotten if it does not."""
        if self._engine is None:
            raise StoreUnavailable("the lease store is not started")
        try:
            async with self._engine.connect() as conn:
                if readonly:
                    await conn.execution_options(broker_readonly=True)
                try:
                    async with conn.begin():
                        yield conn
                        # The audit events the transaction recorded join the chain last:
                        # the chain's head stays locked only from here to the commit.
                        await flush_audit(conn)
                finally:
                    discard_audit(conn)
        except BrokerError:
            raise
        except IntegrityError:
            raise
        except (DBAPIError, SQLAlchemyError, OSError, TimeoutError) as exc:
            # The driver's text may quote a statement's values: its cause at debug only.
            log.debug("a store transaction failed", exc_info=True)
            raise StoreUnavailable(
                f"the lease store is unavailable ({type(exc).__name__}); retry shortly",
                code="store_unavailable",
            ) from None

    @asynccontextmanager
    async def exclusive(self, key: str, *, timeout_s: int = 30) -> AsyncIterator[None]:
        """Hold a lock named ``key`` across replicas (a PostgreSQL advisory lock, released
        with its transaction) around a read-modify-write outside the database, such as an
        IAM policy several revocation workers edit. On SQLite, which serves one replica, the
        caller's in-process lock suffices, and the write lock is not held for it."""
        if self.is_sqlite:
            yield
            return
        async with self.transaction() as conn:
            await conn.execute(text(f"SET LOCAL lock_timeout = '{int(timeout_s)}s'"))
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_id(key)})
            yield

    @asynccontextmanager
    async def try_exclusive(self, key: str) -> AsyncIterator[bool]:
        """Like ``exclusive``, but does not wait: yields False when another replica holds
        the lock (a periodic pass that one replica at a time should run)."""
        if self.is_sqlite:
            yield True
            return
        async with self.transaction() as conn:
            got = (
                await conn.execute(
                    text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _lock_id(key)}
                )
            ).scalar()
            yield bool(got)

    async def ping(self) -> None:
        async with self.transaction(readonly=True) as conn:
            await conn.execute(text("SELECT 1"))

    async def current_revision(self) -> str | None:
        async with self.transaction(readonly=True) as conn:
            try:
                row = (await conn.execute(text("SELECT version_num FROM alembic_version"))).first()
            except SQLAlchemyError:
                return None
        return row[0] if row else None

    async def reach(self) -> None:
        """Connect once (at start-up): a store that cannot be reached raises the one line
        that names it and says whether retrying can help (``broker.leases.reach``)."""
        if self._engine is None:
            raise StoreUnavailable("the lease store is not started")
        if self.is_sqlite:
            # Opened with the standard library first: aiosqlite, failing to open a file,
            # leaves its worker thread to report to an event loop that may have closed.
            await asyncio.to_thread(probe, self._settings.url)
        try:
            async with self._engine.connect():
                pass
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            log.debug("the lease store cannot be reached", exc_info=True)
            raise unreachable(self._settings.url, exc, self._settings.connect_timeout_s) from None

    async def is_migrated(self) -> bool:
        await self.reach()
        try:
            return await self.current_revision() == head_revision()
        except StoreUnavailable:
            raise
        except SQLAlchemyError:
            return False


def _sqlite_pragmas(engine: AsyncEngine) -> None:
    """WAL for concurrent readers, FULL sync so a recorded lease survives a crash, and
    ``BEGIN IMMEDIATE`` so a transaction takes the write lock up front instead of failing
    on upgrade."""

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_conn: Any, _: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        readonly = conn.get_execution_options().get("broker_readonly", False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")
